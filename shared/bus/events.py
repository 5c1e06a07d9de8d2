"""Events on the bus: a daemon publishes on a PUB socket, the frontend subscribes.

Events are fire-and-forget facts ("container X exited with 137"): a
subscriber that is away misses them, which is why runtimed derives events
again when it reattaches to its containers after a restart, and why the
kubelet still relists. A slow subscriber cannot slow the publisher: ZeroMQ
drops messages for a peer whose queue is full.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import msgpack
import structlog
import zmq
import zmq.asyncio

from shared.bus import ipc

log = structlog.get_logger(__name__)

EVENTS_VERSION = 1
# Spans of a service with no network, for the frontend to send on to the collector.
SPANS_TOPIC = "spans"
# Messages queued per subscriber before ZeroMQ starts dropping for it.
SEND_HIGH_WATER_MARK = 10_000


class EventPublisher:
    def __init__(self, endpoint: str, context: zmq.asyncio.Context) -> None:
        self.endpoint = endpoint
        self._socket = context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)

    def bind(self) -> None:
        ipc.prepare(self.endpoint)
        self._socket.bind(self.endpoint)
        ipc.restrict(self.endpoint)

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        """Send one event; never blocks (a full queue drops it for that subscriber)."""
        if self._socket.closed:
            return
        payload = msgpack.packb({"v": EVENTS_VERSION, "topic": topic, "event": event}, use_bin_type=True)
        try:
            self._socket.send_multipart([topic.encode(), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("event_dropped", topic=topic)

    def close(self) -> None:
        self._socket.close(linger=0)


class EventSubscriber:
    def __init__(self, endpoint: str, context: zmq.asyncio.Context, topics: tuple[str, ...] = ("",)) -> None:
        self._socket = context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RECONNECT_IVL, 50)
        self._socket.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        for topic in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._socket.connect(endpoint)

    async def __aiter__(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                body = msgpack.unpackb(frames[-1], raw=False, strict_map_key=False)
                if not isinstance(body, dict) or body.get("v") != EVENTS_VERSION:
                    raise ValueError(f"not an event of version {EVENTS_VERSION}")
                yield str(body["topic"]), dict(body["event"])
            except Exception as e:  # a bad event is skipped, never fatal
                log.warning("event_malformed", error=str(e))

    def close(self) -> None:
        self._socket.close(linger=0)
