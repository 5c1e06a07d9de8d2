"""Port forwarding: TCP connections to a port on a pod's loopback, relayed over the bus.

A connection is opened by `port_forward_child.py`, a short-lived child that
enters the pod's network namespace, connects, and passes the socket back over
a unix socket (SCM_RIGHTS); the daemon itself never changes namespace. The
frontend then moves bytes with pf_write / pf_read (long poll). What the pod
sends waits in the socket's bounded stream buffer; when it is full the socket
is not read, and TCP flow control slows the pod's side down. A connection
nobody has used for `IDLE_TIMEOUT` seconds is closed.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from shared.errors import FailedPrecondition, Internal, InvalidArgument, NotFound, ResourceExhausted

log = structlog.get_logger(__name__)

_CHILD = Path(__file__).with_name("port_forward_child.py")
OPEN_TIMEOUT = 20.0
BUFFER = 64 * 1024
IDLE_TIMEOUT = 60.0
JANITOR_INTERVAL = 5.0
# Each connection keeps about one long poll in flight, out of the bus server's 256 slots.
MAX_CONNECTIONS = 100
MAX_WAIT = 30.0


async def connect_in_netns(netns_path: str | None, port: int, timeout: float = OPEN_TIMEOUT) -> socket.socket:
    """A socket connected to 127.0.0.1:<port> (or [::1]) inside `netns_path` (None: netd's own)."""
    if not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidArgument(f"port {port!r} is not a valid TCP port")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", str(_CHILD), netns_path or "-", str(port), str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            raise Internal(f"cannot start the port-forward helper: {e.strerror}") from None
        theirs.close()
        try:
            _out, stderr = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise FailedPrecondition(f"connecting to port {port} in the pod timed out") from None
        ours.setblocking(False)
        try:
            message, fds, _flags, _addr = socket.recv_fds(ours, 4096, 1)
        except BlockingIOError:
            message, fds = b"", []
        if proc.returncode != 0 or not fds:
            for fd in fds:
                socket.close(fd)
            reason = message.decode(errors="replace").removeprefix("error: ") or \
                stderr.decode(errors="replace").strip() or f"helper exited with status {proc.returncode}"
            raise FailedPrecondition(f"cannot connect to port {port} in the pod: {reason}")
        return socket.socket(fileno=fds[0])
    finally:
        ours.close()
        theirs.close()


class ForwardedConnection:
    def __init__(self, sock: socket.socket, port: int) -> None:
        self.id = secrets.token_hex(16)
        self.sock = sock
        self.port = port
        self.touched = time.monotonic()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._read_lock = asyncio.Lock()

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(sock=self.sock, limit=BUFFER)

    async def read(self, max_bytes: int, wait: float) -> dict[str, Any]:
        self.touched = time.monotonic()
        assert self.reader is not None
        async with self._read_lock:
            try:
                data = await asyncio.wait_for(self.reader.read(max(1, min(max_bytes, BUFFER))),
                                              max(0.0, min(wait, MAX_WAIT)))
            except asyncio.TimeoutError:
                return {"data": b"", "eof": False}
            except (ConnectionError, OSError):
                data = b""
        self.touched = time.monotonic()
        return {"data": data, "eof": not data}

    async def write(self, data: bytes, wait: float) -> dict[str, Any]:
        self.touched = time.monotonic()
        assert self.writer is not None
        if self.writer.is_closing():
            return {"written": 0, "closed": True}
        try:
            await asyncio.wait_for(self.writer.drain(), max(0.0, min(wait, MAX_WAIT)))
        except asyncio.TimeoutError:
            return {"written": 0}
        except (ConnectionError, OSError):
            return {"written": 0, "closed": True}
        self.writer.write(data)
        return {"written": len(data)}

    async def close_write(self) -> None:
        self.touched = time.monotonic()
        if self.writer is not None and not self.writer.is_closing() and self.writer.can_write_eof():
            try:
                self.writer.write_eof()
            except OSError:
                pass

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 5)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass
        else:
            self.sock.close()


class Connections:
    """netd's open port-forward connections, and the janitor closing abandoned ones."""

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.conns: dict[str, ForwardedConnection] = {}
        self._janitor: asyncio.Task[None] | None = None

    async def open(self, netns_path: str | None, port: int) -> dict[str, Any]:
        if len(self.conns) >= self.max_connections:
            raise ResourceExhausted(f"too many port-forward connections (max {self.max_connections})")
        sock = await connect_in_netns(netns_path, port)
        conn = ForwardedConnection(sock, port)
        try:
            await conn.start()
        except BaseException:
            await conn.close()
            raise
        self.conns[conn.id] = conn
        if self._janitor is None or self._janitor.done():
            self._janitor = asyncio.create_task(self._sweep(), name="port-forward-janitor")
        log.info("port_forward_opened", conn=conn.id, port=port)
        return {"conn": conn.id}

    def get(self, conn_id: str) -> ForwardedConnection:
        conn = self.conns.get(conn_id)
        if conn is None:
            raise NotFound(f"port-forward connection {conn_id} not found (closed or expired)")
        return conn

    async def close(self, conn_id: str) -> None:
        conn = self.conns.get(conn_id)
        if conn is not None:
            try:
                await conn.close()
            finally:
                self.conns.pop(conn_id, None)

    async def close_all(self) -> None:
        for conn_id in list(self.conns):
            await self.close(conn_id)
        if self._janitor is not None:
            self._janitor.cancel()
            await asyncio.gather(self._janitor, return_exceptions=True)

    async def _sweep(self) -> None:
        while self.conns:
            await asyncio.sleep(min(JANITOR_INTERVAL, self.idle_timeout / 2))
            now = time.monotonic()
            for conn_id, conn in list(self.conns.items()):
                if now - conn.touched > self.idle_timeout:
                    log.info("port_forward_abandoned", conn=conn_id, port=conn.port)
                    await self.close(conn_id)


def connections_of(owner: Any) -> Connections:
    """The connection registry kept on the daemon object."""
    registry = getattr(owner, "_port_forwards", None)
    if registry is None:
        registry = Connections()
        owner._port_forwards = registry
    return registry

