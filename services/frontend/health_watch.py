"""runtimed's and netd's health, probed beside the requests, for Status to answer from.

The kubelet asks Status every few seconds; each probe is a bus call, so they
run on their own clock (every `interval`, sooner while a daemon is not ready)
rather than inside the call. A daemon whose bus connection is down is not
ready at once, whatever its last probe said. Until a first probe has answered,
or when the last one is too old, Status probes itself, as it did before.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from shared import tracing
from shared.bus.client import BusClient
from shared.errors import CriopyError

log = structlog.get_logger(__name__)

# The next probe of a daemon that was not ready comes this soon.
NOT_READY_INTERVAL = 0.2


class HealthWatch:
    def __init__(self, clients: dict[str, BusClient], daemons: tuple[str, ...], interval: float,
                 timeout: float) -> None:
        self._clients = {name: clients[name] for name in daemons}
        self.interval = interval
        self.timeout = timeout
        self._latest: dict[str, tuple[dict[str, Any], float]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch(name), name=f"health-{name}") for name in self._clients]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def current(self, daemon: str) -> dict[str, Any] | None:
        """The daemon's health as last probed; None when there is no recent probe (probe now)."""
        latest = self._latest.get(daemon)
        if latest is None or time.monotonic() - latest[1] > 2 * self.interval + self.timeout:
            return None
        if not self._clients[daemon].connected:
            return {"service": daemon, "ready": False, "error": f"{daemon} is not connected (down or restarting)"}
        return latest[0]

    async def probe(self, daemon: str) -> dict[str, Any]:
        """Ask the daemon now, waiting at most the configured probe timeout."""
        try:
            return await self._clients[daemon].call("health", deadline=time.time() + self.timeout)
        except CriopyError as e:
            return {"service": daemon, "ready": False, "error": e.message}

    async def _watch(self, daemon: str) -> None:
        with tracing.untraced():
            while True:
                health = await self.probe(daemon)
                self._latest[daemon] = (health, time.monotonic())
                await asyncio.sleep(self.interval if health.get("ready") else min(self.interval, NOT_READY_INTERVAL))
