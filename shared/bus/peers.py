"""Who is calling: the credentials of the process at the other end of a connection, named by shared/identities.py.

ZeroMQ. Every socket a service binds has a ZAP domain (shared/bus/sockets.py).
For each new connection libzmq asks the ZAP handler of the socket's context
(a REP socket at inproc://zeromq.zap.01); over ipc:// it appends the peer's
uid, gid and pid, as the kernel recorded them at connect() (SO_PEERCRED), to
the request's address: "<host>:<uid>:<gid>:<pid>". The handler names the
peer and answers:

  - a bus connection (BUS_DOMAIN) is admitted whoever it is, with the peer's
    names as its User-Id, which libzmq attaches to every message of it: each
    request is then checked against its method's callers, and a refusal is
    answered PERMISSION_DENIED (shared/bus/server.py);
  - an event subscription (EVENTS_DOMAIN) is refused unless the peer is one
    of api.SUBSCRIBERS: a subscriber cannot be answered, only turned away.

Stream sockets are plain unix sockets: their listener reads SO_PEERCRED at
accept (`stream_caller`). Every refusal is logged with the caller's uid and
pid and counted (criopy_bus_refused_total).

The peer's supplementary groups are read from /proc/<pid>/status while the
connection is checked, the peer still waiting for its handshake.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass

import structlog
import zmq
import zmq.asyncio

from shared import metrics
from shared.bus.api import SUBSCRIBERS
from shared.config import Config
from shared.identities import Callers, Peer, describe_roles

log = structlog.get_logger(__name__)

BUS_DOMAIN = "criopy.bus"
EVENTS_DOMAIN = "criopy.events"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_ZAP_VERSION = b"1.0"
# The ZAP reply's metadata property that carries the peer's ids, for the log of a refusal.
_PEER_PROPERTY = "X-Peer"
_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Caller:
    """A peer's names (services or root) and its ids, as a log line shows them."""

    roles: frozenset[str]
    peer: str

    @property
    def name(self) -> str:
        return describe_roles(self.roles)

    def may(self, allowed: frozenset[str]) -> bool:
        return bool(self.roles & allowed)


UNKNOWN = Caller(frozenset(), "unknown peer")


def refused(kind: str, caller: Caller, **fields: object) -> None:
    """Log and count a refused call, subscription or stream."""
    log.warning("caller_refused", kind=kind, caller=caller.name, peer=caller.peer, **fields)
    metrics.BUS_REFUSED.labels(kind, caller.name).inc()


def _caller(callers: Callers, uid: int, gid: int, pid: int) -> Caller:
    peer = Peer.of(uid, gid, pid)
    return Caller(callers.roles(peer), peer.describe())


def stream_caller(sock: socket.socket, callers: Callers) -> Caller:
    """Who connected to a unix stream socket, from SO_PEERCRED."""
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return UNKNOWN
    return _caller(callers, uid, gid, pid)


def _property(frame: zmq.Frame, name: str) -> str | None:
    try:
        return frame.get(name)
    except zmq.ZMQError:
        return None  # absent: libzmq leaves out an empty User-Id


def request_caller(frame: zmq.Frame) -> Caller:
    """Who sent a request, as the ZAP handler named its connection."""
    roles = _property(frame, "User-Id") or ""
    return Caller(frozenset(r for r in roles.split(",") if r), _property(frame, _PEER_PROPERTY) or UNKNOWN.peer)


def _metadata(properties: dict[str, str]) -> bytes:
    """ZMTP metadata: name length (1 byte), name, value length (4 bytes, network order), value."""
    out = b""
    for name, value in properties.items():
        raw = value.encode()
        out += bytes([len(name)]) + name.encode() + struct.pack("!I", len(raw)) + raw
    return out


class ZapHandler:
    """The ZAP handler of one ZeroMQ context, shared by the sockets bound in it while any needs it."""

    _by_context: dict[int, "ZapHandler"] = {}

    def __init__(self, context: zmq.asyncio.Context, callers: Callers) -> None:
        self._context = context
        self.callers = callers
        self._users = 0
        self._socket = context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(ZAP_ENDPOINT)
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._serve(), name="zap-handler")

    @classmethod
    def acquire(cls, context: zmq.asyncio.Context, config: Config) -> "ZapHandler":
        """The context's handler, started on first use; `release` it when the socket that needed it closes."""
        handler = cls._by_context.get(id(context))
        if handler is not None and (handler._task.done() or handler._loop is not asyncio.get_running_loop()):
            handler._shut()  # left by an event loop that has ended (a context shared across loops)
            handler = None
        if handler is None:
            handler = cls._by_context[id(context)] = cls(context, Callers(config))
        handler._users += 1
        return handler

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self._shut()

    def _shut(self) -> None:
        if self._by_context.get(id(self._context)) is self:
            del self._by_context[id(self._context)]
        if not self._task.done():
            try:
                self._task.cancel()
            except RuntimeError:
                pass  # its loop is closed: the task will never run again
        if not self._socket.closed:
            # Unbound at once, so that a new handler can bind the endpoint right away.
            self._socket.unbind(ZAP_ENDPOINT)
            self._socket.close(linger=0)

    async def _serve(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                reply = self._answer(frames)
            except Exception:  # the handler must answer whatever it is asked
                log.exception("zap_request_failed")
                reply = [_ZAP_VERSION, frames[1] if len(frames) > 1 else b"", b"500", b"internal error", b"", b""]
            await self._socket.send_multipart(reply)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        version, request_id, domain, address = frames[0], frames[1], frames[2].decode(), frames[3].decode()
        if version != _ZAP_VERSION:
            return [_ZAP_VERSION, request_id, b"400", b"unsupported ZAP version", b"", b""]
        caller = UNKNOWN
        parts = address.rsplit(":", 3)
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
            caller = _caller(self.callers, int(parts[1]), int(parts[2]), int(parts[3]))
        if domain == EVENTS_DOMAIN and not caller.may(SUBSCRIBERS):
            refused("subscription", caller)
            return [_ZAP_VERSION, request_id, b"400", b"not a subscriber", b"", b""]
        if domain not in (BUS_DOMAIN, EVENTS_DOMAIN):
            return [_ZAP_VERSION, request_id, b"400", b"unknown domain", b"", b""]
        return [_ZAP_VERSION, request_id, b"200", b"OK", ",".join(sorted(caller.roles)).encode(),
                _metadata({_PEER_PROPERTY: caller.peer})]
