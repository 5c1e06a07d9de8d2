"""The frontend: the CRI socket for the kubelet, and the only caller of the daemons."""

from __future__ import annotations

import grpc
import zmq.asyncio

from services.frontend.daemons import Daemons
from services.frontend.grpc_server import start_server
from shared.bus.service import Service


class Frontend(Service):
    name = "frontend"
    # Serves sockets and calls the daemons: it needs no capability.
    capabilities = frozenset()

    async def start(self) -> None:
        self._context = zmq.asyncio.Context.instance()
        self.daemons = Daemons(self.config, self._context)
        self.daemons.connect()
        self._grpc: grpc.aio.Server = await start_server(self.daemons, self.config)

    async def stop(self) -> None:
        await self._grpc.stop(grace=2)
        await self.daemons.close()
