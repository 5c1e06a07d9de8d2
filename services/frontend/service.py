"""The frontend: the CRI socket for the kubelet, and the only caller of the daemons."""

from __future__ import annotations

import asyncio

import grpc
import zmq.asyncio

from services.frontend import abandoned
from services.frontend.daemons import Daemons
from services.frontend.grpc_server import start_server
from services.frontend.metrics_endpoint import MetricsEndpoint
from services.frontend.span_relay import SpanRelay
from services.frontend.streaming import stop_streaming_server, streaming_server
from shared.bus.api import FRONTEND_API
from shared.bus.client import BusClient
from shared.bus.service import Service
from shared.reload import ReloadResult


class Frontend(Service):
    api = FRONTEND_API
    # Serves sockets and calls the daemons: it needs no capability.
    capabilities = frozenset()

    _grpc: grpc.aio.Server | None = None
    _metrics: MetricsEndpoint | None = None
    _supervisor: BusClient | None = None
    daemons: Daemons | None = None
    _recovery: asyncio.Task[None] | None = None
    span_relay: SpanRelay | None = None

    async def start(self) -> None:
        self._context = zmq.asyncio.Context.instance()
        self.daemons = Daemons(self.config, self._context)
        self.daemons.connect()
        # What a frontend killed mid-call left half done (runs while calls are served).
        self._recovery = asyncio.create_task(abandoned.recover(self.daemons), name="recover-abandoned")
        self.span_relay = SpanRelay(self.config, self._context)
        self.span_relay.start()
        # Listening from the start, as CRI-O's, so the first exec gets no extra delay.
        await streaming_server(self.config, self.daemons)
        self._grpc = await start_server(self.daemons, self.config)
        self._supervisor = BusClient.for_service(self.config, "supervisor", self._context)
        self._supervisor.connect()
        await self._start_metrics()

    async def _start_metrics(self) -> None:
        if self._metrics is not None:
            await self._metrics.close()
            self._metrics = None
        if self.config.crio.metrics.enable_metrics:
            self._metrics = MetricsEndpoint(self.config, self.daemons, self._supervisor)
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
        if self._supervisor is not None:
            await self._supervisor.close()
        if self._grpc is not None:
            await self._grpc.stop(grace=2)
        await stop_streaming_server()
        if self.span_relay is not None:
            await self.span_relay.close()
        if self.daemons is not None:
            await self.daemons.close()
