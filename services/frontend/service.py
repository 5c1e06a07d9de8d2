"""The frontend: the CRI socket for the kubelet, and the only caller of the daemons.

It starts as root only to bind the CRI socket, root's and mode 0660 as
CRI-O's; then it runs as its own user (shared/daemon.py), member of each
daemon's group, with no capability at all.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import zmq.asyncio

from services.frontend import abandoned
from services.frontend.daemons import Daemons
from services.frontend.grpc_server import bind_server
from services.frontend.span_relay import SpanRelay
from services.frontend.streaming import stop_streaming_server, streaming_server
from shared.bus.api import FRONTEND_API
from shared.bus.service import Service
from shared.reload import ReloadResult

if TYPE_CHECKING:
    from services.frontend.metrics_endpoint import MetricsEndpoint


class Frontend(Service):
    api = FRONTEND_API
    # Serves sockets and calls the daemons: it needs no capability once the CRI socket is bound.
    capabilities = frozenset()
    # Giving the CRI socket its owner and group.
    bind_capabilities = frozenset({"CAP_CHOWN"})

    _grpc: grpc.aio.Server | None = None
    _metrics: MetricsEndpoint | None = None
    daemons: Daemons | None = None
    _recovery: asyncio.Task[None] | None = None
    span_relay: SpanRelay | None = None

    async def bind(self) -> None:
        self._context = zmq.asyncio.Context.instance()
        # Nothing connects yet: the daemons must see the frontend's own user, not root.
        self.daemons = Daemons(self.config, self._context)
        self._grpc = await bind_server(self.daemons, self.config)

    async def start(self) -> None:
        assert self.daemons is not None and self._grpc is not None
        self.daemons.connect()
        # What a frontend killed mid-call left half done (runs while calls are served).
        self._recovery = asyncio.create_task(abandoned.recover(self.daemons), name="recover-abandoned")
        self.span_relay = SpanRelay(self.config, self._context)
        self.span_relay.start()
        # Listening from the start, as CRI-O's, so the first exec gets no extra delay.
        await streaming_server(self.config, self.daemons)
        await self._grpc.start()
        await self._start_metrics()

    async def _start_metrics(self) -> None:
        if self._metrics is not None:
            await self._metrics.close()
            self._metrics = None
        if self.config.crio.metrics.enable_metrics:
            # Loaded with metrics only: it brings prometheus_client (see shared/metrics.py).
            from services.frontend.metrics_endpoint import MetricsEndpoint

            self._metrics = MetricsEndpoint(self.config, self.daemons)
            await self._metrics.start()

    async def apply_config(self, result: ReloadResult) -> None:
        if any(path.startswith("crio.metrics.") for path in result.applied):
            await self._start_metrics()

    async def stop(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        if self._metrics is not None:
            await self._metrics.close()
        if self._grpc is not None:
            await self._grpc.stop(grace=2)
        await stop_streaming_server()
        if self.span_relay is not None:
            await self.span_relay.close()
        if self.daemons is not None:
            await self.daemons.close()
