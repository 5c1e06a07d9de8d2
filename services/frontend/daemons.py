"""The frontend's bus clients, one per daemon."""

from __future__ import annotations

import secrets
import time
from typing import Any

import zmq.asyncio

from services.frontend.event_hub import EventHub
from shared import faults
from shared.bus.client import BusClient
from shared.config import Config
from shared.services import DAEMONS


class Daemons:
    """`daemons.call("runtimed", "create_container", deadline=..., **params)`; `daemons.events` for their events."""

    def __init__(self, config: Config, context: zmq.asyncio.Context) -> None:
        self.config = config
        # This frontend process's name, which runtimed's reservations carry: those of
        # another name were left by a frontend that died (see runtimed's reservations.py).
        self.instance = secrets.token_hex(8)
        # Their events (runtimed's, for GetContainerEvents), fanned out to CRI clients.
        self.events = EventHub(config, context)
        self.clients: dict[str, BusClient] = {name: BusClient.for_service(config, name, context) for name in DAEMONS}

    def connect(self) -> None:
        for client in self.clients.values():
            client.connect()
        self.events.start()

    async def close(self) -> None:
        await self.events.close()
        for client in self.clients.values():
            await client.close()

    async def call(self, daemon: str, method: str, *, deadline: float, **params: Any) -> Any:
        result = await self.clients[daemon].call(method, deadline=deadline, **params)
        faults.point(f"frontend.after.{daemon}.{method}")
        return result

    async def health(self, daemon: str) -> dict[str, Any]:
        """The daemon's health, waiting at most the configured probe timeout."""
        deadline = time.time() + self.config.criopy.bus.health_timeout
        return await self.clients[daemon].call("health", deadline=deadline)
