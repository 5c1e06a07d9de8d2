"""Where the streams' bytes go: exec/attach sessions in runtimed, connections in netd.

The streaming server speaks to `Backend`; `BusBackend` is the real one. A
session starts with a bus call that does what may fail with a typed error and
answers with a token:

  runtimed: exec_start(container_id, cmd, tty, stdin, stdout, stderr),
            attach_start(container_id, tty, stdin, stdout, stderr) -> {"token"}
  netd:     pf_open(pod_id, port, host_network) -> {"token"}

then its bytes go over a connection of its own to the daemon's stream socket
(shared/bus/streams.py), not over the bus: output and the exit status come in
frames, input goes out within the daemon's credit, and closing the connection
ends the session in the daemon.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from shared.bus.stream_client import ClientStream
from shared.bus.stream_frames import STDOUT, End
from shared.errors import Internal, Unavailable

CALL_TIMEOUT = 30.0


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


class StreamProcessSession:
    """An exec or attach session in runtimed, through its stream."""

    def __init__(self, stream: ClientStream) -> None:
        self.stream = stream

    async def write(self, data: bytes) -> None:
        try:
            await self.stream.write(data)
        except ConnectionError:
            pass  # stdin is gone; what the client still types has nowhere to go

    async def close_stdin(self) -> None:
        await self.stream.end_input()

    async def read(self) -> Output:
        got = await self.stream.read()
        if isinstance(got, End):
            return Output(done=True, exit_code=got.exit_code, error=got.error)
        kind, data = got
        return Output(stdout=data) if kind == STDOUT else Output(stderr=data)

    async def resize(self, width: int, height: int) -> None:
        await self.stream.resize(width, height)

    async def close(self) -> None:
        await self.stream.close()


class StreamConnection:
    """A port-forward connection in netd, through its stream."""

    def __init__(self, stream: ClientStream) -> None:
        self.stream = stream

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)  # ConnectionResetError once the pod's side has ended

    async def read(self) -> bytes:
        got = await self.stream.read()
        if isinstance(got, End):
            if got.error:
                raise Unavailable(got.error)
            return b""
        return got[1]

    async def close_write(self) -> None:
        await self.stream.end_input()

    async def close(self) -> None:
        await self.stream.close()


class BusBackend:
    def __init__(self, daemons: Any) -> None:
        self.daemons = daemons

    async def _open(self, daemon: str, method: str, **params: Any) -> ClientStream:
        r = await self.daemons.call(daemon, method, deadline=time.time() + CALL_TIMEOUT, **params)
        if not isinstance(r, dict) or not isinstance(r.get("token"), str):
            raise Internal(f"{daemon}.{method} did not name a stream")
        return await ClientStream.connect(daemon, self.daemons.config.stream_socket(daemon), r["token"])

    async def exec(self, container_id: str, cmd: list[str], *, tty: bool, stdin: bool, stdout: bool,
                   stderr: bool) -> StreamProcessSession:
        return StreamProcessSession(await self._open(
            "runtimed", "exec_start", container_id=container_id, cmd=list(cmd), tty=tty, stdin=stdin,
            stdout=stdout, stderr=stderr))

    async def attach(self, container_id: str, *, tty: bool, stdin: bool, stdout: bool,
                     stderr: bool) -> StreamProcessSession:
        return StreamProcessSession(await self._open(
            "runtimed", "attach_start", container_id=container_id, tty=tty, stdin=stdin, stdout=stdout,
            stderr=stderr))

    async def port_forward(self, pod_id: str, port: int, *, host_network: bool) -> StreamConnection:
        return StreamConnection(await self._open("netd", "pf_open", pod_id=pod_id, port=port,
                                                 host_network=host_network))


async def cancel_quietly(*tasks: "asyncio.Task[Any] | None") -> None:
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    await asyncio.gather(*live, return_exceptions=True)
