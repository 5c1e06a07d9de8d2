"""Fan-out of runtimed's events to every GetContainerEvents client.

The subscription to runtimed's event socket (subscription.py) hands each
container and pod event to `deliver`, which puts it in a bounded queue per
client. A client whose queue is full is dropped (its stream ends) rather than
making the runtime or the other clients wait.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from shared import metrics

log = structlog.get_logger(__name__)

CLIENT_QUEUE_SIZE = 1000


class SlowClient(Exception):
    """The client did not keep up with the events and was dropped."""


# runtimed's topics for GetContainerEvents.
TOPICS = ("container", "sandbox")


class EventHub:
    def __init__(self) -> None:
        self._clients: set[asyncio.Queue[dict[str, Any] | SlowClient]] = set()

    def deliver(self, topic: str, event: dict[str, Any]) -> None:
        """One of runtimed's events, for every client."""
        event = {**event, "topic": topic}
        for queue in list(self._clients):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._clients.discard(queue)
                queue.get_nowait()  # make room for the verdict
                queue.put_nowait(SlowClient())
                # This event and the one given up for the verdict never reach that client.
                metrics.CRIO_CONTAINERS_EVENTS_DROPPED.inc(2)
                log.warning("event_client_dropped", reason="queue full")

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | SlowClient]:
        queue: asyncio.Queue[dict[str, Any] | SlowClient] = asyncio.Queue(CLIENT_QUEUE_SIZE)
        self._clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | SlowClient]) -> None:
        self._clients.discard(queue)

    @property
    def client_count(self) -> int:
        return len(self._clients)
