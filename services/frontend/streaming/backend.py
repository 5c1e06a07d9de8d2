"""Where the streams' bytes go: exec/attach sessions in runtimed, connections in netd.

The streaming server speaks to `Backend`; `BusBackend` is the real one, a
session protocol over the bus:

  runtimed: exec_start / attach_start -> {"session"}; session_write(session, data)
            -> {"written"} (0 while the process's stdin is full); session_read(session,
            max_bytes, wait) -> {"stdout", "stderr", "done", "exit_code", "error"} (long
            poll; the daemon's buffers are bounded, so a reader that stops asking stops
            the process's output); session_close_stdin, session_resize, session_close.
  netd:     pf_open(pod_id, port, host_network) -> {"conn"}; pf_write(conn, data)
            -> {"written"}; pf_read(conn, max_bytes, wait) -> {"data", "eof"};
            pf_close_write(conn); pf_close(conn).

Each call carries a short deadline; a long poll returns empty-handed after
`wait` seconds so that a session whose frontend vanished is noticed by the
daemon (no calls for a while) and cleaned up.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from shared.errors import CriopyError, Internal

READ_CHUNK = 64 * 1024
LONG_POLL = 5.0
CALL_MARGIN = 10.0
WRITE_CHUNK = 64 * 1024
# Ending a session may wait for runc to write the process's pid and for the kill to land.
CLOSE_WAIT = 20.0


@dataclass
class Output:
    stdout: bytes = b""
    stderr: bytes = b""
    done: bool = False
    exit_code: int | None = None
    error: str | None = None


class ProcessSession(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...

    async def read(self) -> Output: ...

    async def resize(self, width: int, height: int) -> None: ...

    async def close(self) -> None: ...


class Connection(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def read(self) -> bytes: ...  # b"" at end of stream

    async def close_write(self) -> None: ...

    async def close(self) -> None: ...


class Backend(Protocol):
    async def exec(self, container_id: str, cmd: list[str], *, tty: bool, stdin: bool, stdout: bool,
                   stderr: bool) -> ProcessSession: ...

    async def attach(self, container_id: str, *, tty: bool, stdin: bool, stdout: bool,
                     stderr: bool) -> ProcessSession: ...

    async def port_forward(self, pod_id: str, port: int, *, host_network: bool) -> Connection: ...


class _Bus:
    def __init__(self, daemons: Any, daemon: str) -> None:
        self.daemons = daemons
        self.daemon = daemon

    async def call(self, method: str, *, wait: float = 0.0, **params: Any) -> Any:
        deadline = time.time() + wait + CALL_MARGIN
        return await self.daemons.call(self.daemon, method, deadline=deadline, **params)


class BusProcessSession:
    def __init__(self, bus: _Bus, session: str) -> None:
        self.bus = bus
        self.session = session
        self._closed = False

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            chunk = bytes(view[:WRITE_CHUNK])
            result = await self.bus.call("session_write", wait=LONG_POLL, session=self.session, data=chunk,
                                         wait_seconds=LONG_POLL)
            written = int(result.get("written", 0))
            if result.get("closed"):
                return  # stdin is gone; what the client still types has nowhere to go
            view = view[written:]

    async def close_stdin(self) -> None:
        await self.bus.call("session_close_stdin", session=self.session)

    async def read(self) -> Output:
        r = await self.bus.call("session_read", wait=LONG_POLL, session=self.session, max_bytes=READ_CHUNK,
                                wait_seconds=LONG_POLL)
        return Output(stdout=r.get("stdout") or b"", stderr=r.get("stderr") or b"", done=bool(r.get("done")),
                      exit_code=r.get("exit_code"), error=r.get("error"))

    async def resize(self, width: int, height: int) -> None:
        await self.bus.call("session_resize", session=self.session, width=width, height=height)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.bus.call("session_close", wait=CLOSE_WAIT, session=self.session)
        except CriopyError:
            pass  # the daemon's janitor ends what we could not


class BusConnection:
    def __init__(self, bus: _Bus, conn: str) -> None:
        self.bus = bus
        self.conn = conn
        self._closed = False

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            result = await self.bus.call("pf_write", wait=LONG_POLL, conn=self.conn, data=bytes(view[:WRITE_CHUNK]),
                                         wait_seconds=LONG_POLL)
            if result.get("closed"):
                raise ConnectionResetError("the pod's side of the connection is closed")
            view = view[int(result.get("written", 0)):]

    async def read(self) -> bytes:
        while True:
            r = await self.bus.call("pf_read", wait=LONG_POLL, conn=self.conn, max_bytes=READ_CHUNK,
                                    wait_seconds=LONG_POLL)
            if r.get("data"):
                return r["data"]
            if r.get("eof"):
                return b""

    async def close_write(self) -> None:
        await self.bus.call("pf_close_write", conn=self.conn)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.bus.call("pf_close", conn=self.conn)
        except CriopyError:
            pass


class BusBackend:
    def __init__(self, daemons: Any) -> None:
        self.runtimed = _Bus(daemons, "runtimed")
        self.netd = _Bus(daemons, "netd")

    async def exec(self, container_id: str, cmd: list[str], *, tty: bool, stdin: bool, stdout: bool,
                   stderr: bool) -> BusProcessSession:
        r = await self.runtimed.call("exec_start", container_id=container_id, cmd=list(cmd), tty=tty,
                                     stdin=stdin, stdout=stdout, stderr=stderr)
        return BusProcessSession(self.runtimed, r["session"])

    async def attach(self, container_id: str, *, tty: bool, stdin: bool, stdout: bool,
                     stderr: bool) -> BusProcessSession:
        r = await self.runtimed.call("attach_start", container_id=container_id, tty=tty, stdin=stdin,
                                     stdout=stdout, stderr=stderr)
        return BusProcessSession(self.runtimed, r["session"])

    async def port_forward(self, pod_id: str, port: int, *, host_network: bool) -> BusConnection:
        r = await self.netd.call("pf_open", pod_id=pod_id, port=port, host_network=host_network)
        if "conn" not in r:
            raise Internal("netd did not open a connection")
        return BusConnection(self.netd, r["conn"])


async def cancel_quietly(*tasks: "asyncio.Task[Any] | None") -> None:
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    await asyncio.gather(*live, return_exceptions=True)
