"""The frontend's bus clients, one per daemon, their event subscriptions, and the read model."""

from __future__ import annotations

import secrets
import time
from typing import Any

import zmq.asyncio

from services.frontend import event_hub
from services.frontend.event_hub import EventHub
from services.frontend.read_model import ReadModel
from services.frontend.subscription import Subscription
from shared import faults
from shared.bus.client import BusClient
from shared.bus.feed import TOPIC as FEED_TOPIC
from shared.config import Config
from shared.services import DAEMONS


class Daemons:
    """`daemons.call("runtimed", "create_container", deadline=..., **params)`; `daemons.events` for their events;
    `daemons.model` for the read model (None when `[criopy.frontend] read_model` is off)."""

    def __init__(self, config: Config, context: zmq.asyncio.Context) -> None:
        self.config = config
        # This frontend process's name, which runtimed's reservations carry: those of
        # another name were left by a frontend that died (see runtimed's reservations.py).
        self.instance = secrets.token_hex(8)
        self.clients: dict[str, BusClient] = {name: BusClient.for_service(config, name, context) for name in DAEMONS}
        # runtimed's container and pod events, fanned out to CRI clients.
        self.events = EventHub()
        self.model = ReadModel(config, self.clients) if config.criopy.frontend.read_model else None
        runtimed = {topic: self.events.deliver for topic in event_hub.TOPICS}
        self._subscriptions = []
        if self.model is None:
            self._subscriptions.append(Subscription(config.events_endpoint("runtimed"), context, runtimed))
        else:
            for daemon, mirror in self.model.mirrors.items():
                handlers = {**(runtimed if daemon == "runtimed" else {}),
                            FEED_TOPIC: lambda _topic, message, mirror=mirror: mirror.receive(message)}
                self._subscriptions.append(Subscription(config.events_endpoint(daemon), context, handlers,
                                                        on_connection=mirror.connection))

    def connect(self) -> None:
        for client in self.clients.values():
            client.connect()
        for subscription in self._subscriptions:
            subscription.start()
        if self.model is not None:
            self.model.start()

    async def close(self) -> None:
        if self.model is not None:
            await self.model.close()
        for subscription in self._subscriptions:
            await subscription.close()
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
