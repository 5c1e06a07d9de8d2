"""Events on the bus: a daemon publishes on a PUB socket, the frontend subscribes.

Events are fire-and-forget facts ("container X exited with 137"): a
subscriber that is away misses them, which is why runtimed derives events
again when it reattaches to its containers after a restart, and why the
kubelet still relists. A slow subscriber cannot slow the publisher: ZeroMQ
drops messages for a peer whose queue is full. Only the frontend may
subscribe (api.SUBSCRIBERS): anyone else is turned away at the handshake
(shared/bus/peers.py).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import msgpack
import structlog
import zmq
import zmq.asyncio

from shared.bus import sockets
from shared.bus.peers import EVENTS_DOMAIN, ZapHandler
from shared.config import Config

log = structlog.get_logger(__name__)

EVENTS_VERSION = 1
# Spans of a service with no network, for the frontend to send on to the collector.
SPANS_TOPIC = "spans"


class EventPublisher:
    def __init__(self, endpoint: str, context: zmq.asyncio.Context, config: Config | None = None) -> None:
        self.endpoint = endpoint
        self._context = context
        # Whose credentials are the subscribers' (the defaults when none is given).
        self._config = config or Config()
        self._socket: zmq.asyncio.Socket | None = None
        self._zap: ZapHandler | None = None

    def bind(self) -> None:
        """Bind the socket; call with the event loop running (it serves the subscribers' checks)."""
        self._zap = ZapHandler.acquire(self._context, self._config)
        self._socket = sockets.publisher(self._context, self.endpoint, zap_domain=EVENTS_DOMAIN)

    def watch_subscribers(self) -> sockets.Monitor:
        """Subscribers admitted from now on: `await monitor.next()` returns when one has.

        For a publisher that must not speak before its subscriber is back (a
        PUB socket drops what it sends to nobody); the caller closes it.
        """
        assert self._socket is not None, "bind first"
        # Past the handshake, so past the credentials check: a refused peer is no subscriber.
        return sockets.Monitor(self._socket, zmq.EVENT_HANDSHAKE_SUCCEEDED)

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        """Send one event; never blocks (a full queue drops it for that subscriber)."""
        if self._socket is None or self._socket.closed:
            return
        payload = msgpack.packb({"v": EVENTS_VERSION, "topic": topic, "event": event}, use_bin_type=True)
        try:
            self._socket.send_multipart([topic.encode(), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("event_dropped", topic=topic)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
        if self._zap is not None:
            self._zap.release()
            self._zap = None


class EventSubscriber:
    def __init__(self, endpoint: str, context: zmq.asyncio.Context, topics: tuple[str, ...] = ("",)) -> None:
        self._socket = sockets.subscriber(context, endpoint, topics)

    def watch_connection(self) -> sockets.Monitor:
        """The socket's connections and disconnections from now on; the caller closes it."""
        return sockets.Monitor(self._socket, zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)

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
