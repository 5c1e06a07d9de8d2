"""The bus's ZeroMQ sockets, made in one place: their options, their ipc:// files, their monitors.

Every socket closes without lingering (a daemon that stops must not hang on
unsent replies). Connecting sockets retry quickly, so a restarted daemon is
found again within half a second. Binding sockets take over an ipc:// file a
predecessor left (never one still served), only the owner and its group may
connect to them, and every connection to them passes the ZAP handler of
their context (shared/bus/peers.py), which names the caller: a connection
that no handler answers is refused.
"""

from __future__ import annotations

from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from shared.bus import ipc

RECONNECT_INTERVAL_MS = 50
RECONNECT_INTERVAL_MAX_MS = 500
# Messages queued per subscriber before ZeroMQ starts dropping for it.
SEND_HIGH_WATER_MARK = 10_000


def _socket(context: zmq.asyncio.Context, kind: int) -> zmq.asyncio.Socket:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def _bind(sock: zmq.asyncio.Socket, endpoint: str, zap_domain: str) -> zmq.asyncio.Socket:
    sock.setsockopt(zmq.ZAP_DOMAIN, zap_domain.encode())
    # Without a handler answering, a connection is refused rather than let through.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    try:
        ipc.prepare(endpoint)
        sock.bind(endpoint)
    except BaseException:
        sock.close(linger=0)  # an open socket would hold its context's termination forever
        raise
    path = ipc.path_of(endpoint)
    if path is not None:
        ipc.restrict(path)
    return sock


def _connect(sock: zmq.asyncio.Socket, endpoint: str) -> zmq.asyncio.Socket:
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_INTERVAL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_INTERVAL_MAX_MS)
    sock.connect(endpoint)
    return sock


def router(context: zmq.asyncio.Context, endpoint: str, *, max_message_bytes: int,
           zap_domain: str) -> zmq.asyncio.Socket:
    """A daemon's request socket, bound; its callers are checked in `zap_domain`."""
    sock = _socket(context, zmq.ROUTER)
    # Far larger messages are cut off by ZeroMQ itself (it drops the peer);
    # up to this size the server can still read the id and answer with an error.
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes * 4)
    return _bind(sock, endpoint, zap_domain)


def dealer(context: zmq.asyncio.Context) -> zmq.asyncio.Socket:
    """A caller's socket to one daemon; `connect` it once its monitor is made, so no event is missed."""
    sock = _socket(context, zmq.DEALER)
    # Never queue a request for a daemon that is not connected: it fails at once and is retried.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    return sock


def connect(sock: zmq.asyncio.Socket, endpoint: str) -> None:
    """Connect a socket made by `dealer`, retrying quickly while the daemon is away."""
    _connect(sock, endpoint)


def publisher(context: zmq.asyncio.Context, endpoint: str, *, zap_domain: str) -> zmq.asyncio.Socket:
    """A daemon's event socket, bound; its subscribers are checked in `zap_domain`."""
    sock = _socket(context, zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
    return _bind(sock, endpoint, zap_domain)


def subscriber(context: zmq.asyncio.Context, endpoint: str, topics: tuple[str, ...]) -> zmq.asyncio.Socket:
    """A socket receiving a daemon's events on `topics` ("" for all), connected."""
    sock = _socket(context, zmq.SUB)
    for topic in topics:
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    return _connect(sock, endpoint)


class Monitor:
    """Connection events of one socket (ZeroMQ's socket monitor), read without blocking the loop.

    Made before the socket connects or binds, so that no event is missed;
    closed by whoever made it, which also stops the socket's monitoring.
    """

    def __init__(self, sock: zmq.asyncio.Socket, events: int) -> None:
        self._socket = sock
        self._monitor: zmq.asyncio.Socket = sock.get_monitor_socket(events)

    async def next(self) -> dict[str, Any]:
        """The next event: {"event": zmq.EVENT_..., "value": ..., "endpoint": ...}."""
        return parse_monitor_message(await self._monitor.recv_multipart())

    def close(self) -> None:
        if self._monitor.closed:
            return
        if not self._socket.closed:
            try:
                self._socket.disable_monitor()
            except zmq.ZMQError:
                pass
        self._monitor.close(linger=0)
