"""The frontend: the CRI socket for the kubelet, and the only caller of the daemons."""

from __future__ import annotations

import grpc
import zmq.asyncio

from services.frontend.daemons import Daemons
from services.frontend.grpc_server import start_server
from services.frontend.metrics_endpoint import MetricsEndpoint
from shared.bus.client import BusClient
from shared.bus.service import Service
from shared.reload import ReloadResult


class Frontend(Service):
    name = "frontend"
    # Serves sockets and calls the daemons: it needs no capability.
    capabilities = frozenset()

    async def start(self) -> None:
        self._context = zmq.asyncio.Context.instance()
        self.daemons = Daemons(self.config, self._context)
        self.daemons.connect()
        self._grpc: grpc.aio.Server = await start_server(self.daemons, self.config)
        from shared.supervisor import SupervisorApi

        self._supervisor = BusClient("supervisor", self.config.bus_endpoint("supervisor"),
                                     SupervisorApi.bus_methods(), context=self._context)
        self._supervisor.connect()
        self._metrics: MetricsEndpoint | None = None
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
        if self._metrics is not None:
            await self._metrics.close()
        await self._supervisor.close()
        await self._grpc.stop(grace=2)
        await self.daemons.close()
