"""Fan-out of runtimed's events to every GetContainerEvents client.

One subscription to runtimed's event socket feeds a bounded queue per client.
A client whose queue is full is dropped (its stream ends) rather than making
the runtime or the other clients wait.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
import zmq.asyncio

from shared import metrics
from shared.bus.events import EventSubscriber
from shared.config import Config

log = structlog.get_logger(__name__)

CLIENT_QUEUE_SIZE = 1000


class SlowClient(Exception):
    """The client did not keep up with the events and was dropped."""


class EventHub:
    def __init__(self, config: Config, context: zmq.asyncio.Context) -> None:
        self._endpoint = config.events_endpoint("runtimed")
        self._context = context
        # Connected by `start`, once the frontend runs as its own user.
        self._subscriber: EventSubscriber | None = None
        self._clients: set[asyncio.Queue[dict[str, Any] | SlowClient]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._subscriber = EventSubscriber(self._endpoint, self._context)
        self._task = asyncio.create_task(self._pump(self._subscriber), name="event-hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._subscriber is not None:
            self._subscriber.close()

    async def _pump(self, subscriber: EventSubscriber) -> None:
        async for topic, event in subscriber:
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
