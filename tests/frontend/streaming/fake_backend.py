"""An in-process backend for the streaming server's tests: host processes and loopback TCP.

Exec runs the command on the host (pipes, or a pty for tty), attach runs it
too (as if it were the container's main process), port-forward connects to
127.0.0.1:<port>. Good enough to test the protocols end to end.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import struct
import termios
import tty as ttymod

from services.frontend.streaming.backend import Output
from shared.errors import NotFound


class FakeSession:
    def __init__(self, proc: asyncio.subprocess.Process, master: int | None, stdin_writer) -> None:
        self.proc = proc
        self.master = master
        self.stdin_writer = stdin_writer
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(4)
        self.resizes: list[tuple[int, int]] = []
        self.closed = False
        self.readers: list[asyncio.Task] = []
        self.stdin_closed = False

    async def _pump(self, name: str, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                data = await reader.read(4096)
            except OSError:
                data = b""
            if not data:
                break
            await self.queue.put((name, data))

    async def write(self, data: bytes) -> None:
        self.stdin_writer.write(data)
        await self.stdin_writer.drain()

    async def close_stdin(self) -> None:
        self.stdin_closed = True
        if self.master is not None:
            self.stdin_writer.write(b"\x04")
            await self.stdin_writer.drain()
        else:
            self.stdin_writer.close()

    async def read(self) -> Output:
        out = Output()
        while True:
            if not self.queue.empty():
                name, data = self.queue.get_nowait()
                setattr(out, name, data)
                return out
            running = [t for t in self.readers if not t.done()]
            if not running:
                break
            getter = asyncio.ensure_future(self.queue.get())
            await asyncio.wait({getter, *running}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                name, data = getter.result()
                setattr(out, name, data)
                return out
            getter.cancel()
        out.exit_code = await self.proc.wait()
        out.done = True
        return out

    async def resize(self, width: int, height: int) -> None:
        self.resizes.append((width, height))
        if self.master is not None:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def close(self) -> None:
        self.closed = True
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for task in self.readers:
            task.cancel()
        if self.master is not None:
            os.close(self.master)
            self.master = None


class FakeConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self) -> bytes:
        return await self.reader.read(65536)

    async def close_write(self) -> None:
        if self.writer.can_write_eof():
            self.writer.write_eof()

    async def close(self) -> None:
        self.writer.close()


class FakeBackend:
    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []
        self.attach_cmd = ["cat"]

    async def _start(self, cmd: list[str], tty: bool, stdin: bool) -> FakeSession:
        loop = asyncio.get_running_loop()
        if tty:
            master, slave = pty.openpty()
            ttymod.setraw(slave)
            proc = await asyncio.create_subprocess_exec(*cmd, stdin=slave, stdout=slave, stderr=slave,
                                                        start_new_session=True)
            os.close(slave)
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(master), "rb", 0))
            wt, wp = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                   os.fdopen(os.dup(master), "wb", 0))
            writer = asyncio.StreamWriter(wt, wp, None, loop)
            session = FakeSession(proc, master, writer)
            session.readers = [asyncio.create_task(session._pump("stdout", reader))]
        else:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            session = FakeSession(proc, None, proc.stdin)
            session.readers = [asyncio.create_task(session._pump("stdout", proc.stdout)),
                               asyncio.create_task(session._pump("stderr", proc.stderr))]
        self.sessions.append(session)
        return session

    async def exec(self, container_id, cmd, *, tty, stdin, stdout, stderr):
        if container_id == "missing":
            raise NotFound(f"container {container_id} not found")
        return await self._start(list(cmd), tty, stdin)

    async def attach(self, container_id, *, tty, stdin, stdout, stderr):
        return await self._start(self.attach_cmd, tty, stdin)

    async def port_forward(self, pod_id, port, *, host_network):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            raise ConnectionRefusedError(f"dial tcp 127.0.0.1:{port}: {e.strerror}") from None
        return FakeConnection(reader, writer)
