"""A daemon's event socket, read by one task: each event goes to whoever handles its topic.

runtimed's socket carries the container and pod events of GetContainerEvents
(event_hub.py) and its state feed (read_model.py): one subscription for both,
since runtimed holds back the events it finds at start until a subscriber is
back, and two sockets would not come back at the same moment.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import structlog
import zmq
import zmq.asyncio

from shared.bus.events import EventSubscriber

log = structlog.get_logger(__name__)

Handler = Callable[[str, dict[str, Any]], None]


class Subscription:
    def __init__(self, endpoint: str, context: zmq.asyncio.Context, handlers: dict[str, Handler],
                 on_connection: Callable[[bool], None] | None = None) -> None:
        self._handlers = handlers
        self._on_connection = on_connection
        self._endpoint = endpoint
        self._context = context
        # Connected by `start`, once the frontend runs as its own user: the daemon checks
        # the credentials the connection was made with.
        self._subscriber: EventSubscriber | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._subscriber = EventSubscriber(self._endpoint, self._context, topics=tuple(self._handlers))
        self._tasks = [asyncio.create_task(self._pump(), name="subscription")]
        if self._on_connection is not None:
            self._tasks.append(asyncio.create_task(self._watch(), name="subscription-monitor"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._subscriber is not None:
            self._subscriber.close()

    async def _pump(self) -> None:
        assert self._subscriber is not None
        async for topic, event in self._subscriber:
            handler = self._handlers.get(topic)
            if handler is None:
                continue
            try:
                handler(topic, event)
            except Exception:  # one bad event never stops the others
                log.exception("event_handler_failed", topic=topic)

    async def _watch(self) -> None:
        assert self._on_connection is not None and self._subscriber is not None
        monitor = self._subscriber.watch_connection()
        try:
            while True:
                event = await monitor.next()
                if event["event"] in (zmq.EVENT_CONNECTED, zmq.EVENT_DISCONNECTED):
                    self._on_connection(event["event"] == zmq.EVENT_CONNECTED)
        finally:
            monitor.close()
