"""Streaming exec and attach sessions: processes whose stdio the frontend relays over the bus.

Exec runs `runc exec` for a process spec built from the container's own
(environment, user, capabilities, cwd) with the requested command. With a
terminal, runc gets a pseudo-terminal of ours as its stdio and relays it to
the container's terminal; a resize sets our terminal's size and sends runc
SIGWINCH, which runc copies to the container's terminal. Without one, plain
pipes.

Attach connects to conmon's attach socket (`<attach dir>/<id>/attach`, a
SOCK_SEQPACKET socket): each packet from conmon is one byte naming the pipe
(2 stdout, 3 stderr) then data; what we send goes to the container's stdin;
shutting down our write side tells conmon that stdin ended. Resizes go through
conmon's control fifo.

Output waits in a bounded buffer; while it is full nothing more is read from
the process, whose writes then block: a client that stops reading stops the
process, not the daemon's memory. A session nobody has asked about for
`IDLE_TIMEOUT` seconds is ended (process killed, descriptors closed).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import secrets
import signal
import socket
import struct
import termios
import time
import tty
from typing import Any

import structlog

from services.runtimed import conmon
from services.runtimed.runc import Runc
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

log = structlog.get_logger(__name__)

OUTPUT_LIMIT = 256 * 1024
READ_SIZE = 32 * 1024
STDIN_CHUNK = 8192  # conmon reads its attach socket 8 KiB at a time
IDLE_TIMEOUT = 60.0
JANITOR_INTERVAL = 5.0
# Each live session keeps about one long poll in flight, out of the bus server's 256 slots.
MAX_SESSIONS = 100
MAX_WAIT = 30.0
PID_FILE_WAIT = 5.0
ATTACH_STDOUT = 2
ATTACH_STDERR = 3


class Session:
    """Bounded output buffer, stdin, exit status: what every session kind shares."""

    kind = "session"

    def __init__(self) -> None:
        self.id = secrets.token_hex(16)
        self.touched = time.monotonic()
        self._chunks: list[tuple[str, bytes]] = []
        self._size = 0
        self._changed = asyncio.Condition()
        self.output_done = False
        self.done = False
        self.exit_code: int | None = None
        self.error: str | None = None
        self.closed = False
        self._tasks: list[asyncio.Task[Any]] = []

    # -- output -------------------------------------------------------------

    async def _push(self, stream: str, data: bytes) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._size < OUTPUT_LIMIT or self.closed)
            if self.closed:
                return
            self._chunks.append((stream, data))
            self._size += len(data)
            self._changed.notify_all()

    async def _finish(self, exit_code: int | None = None, error: str | None = None) -> None:
        async with self._changed:
            self.exit_code = exit_code
            self.error = error
            self.done = True
            self._changed.notify_all()

    async def read(self, max_bytes: int, wait: float) -> dict[str, Any]:
        self.touched = time.monotonic()
        wait = max(0.0, min(wait, MAX_WAIT))
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._chunks or self.done), wait)
            except asyncio.TimeoutError:
                pass
            out = {"stdout": bytearray(), "stderr": bytearray()}
            budget = max(1, max_bytes)
            while self._chunks and budget > 0:
                stream, data = self._chunks[0]
                if len(data) > budget:
                    out[stream] += data[:budget]
                    self._chunks[0] = (stream, data[budget:])
                    self._size -= budget
                    budget = 0
                    break
                out[stream] += data
                self._chunks.pop(0)
                self._size -= len(data)
                budget -= len(data)
            self._changed.notify_all()
            finished = self.done and not self._chunks
        self.touched = time.monotonic()
        return {"stdout": bytes(out["stdout"]), "stderr": bytes(out["stderr"]), "done": finished,
                "exit_code": self.exit_code if finished else None, "error": self.error if finished else None}

    # -- input and control: per kind ------------------------------------------

    async def write(self, data: bytes, wait: float) -> dict[str, Any]:
        raise NotImplementedError

    async def close_stdin(self) -> None:
        raise NotImplementedError

    async def resize(self, width: int, height: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        self.closed = True
        async with self._changed:
            self._changed.notify_all()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _pump(session: Session, stream: str, reader: asyncio.StreamReader) -> None:
    while True:
        try:
            data = await reader.read(READ_SIZE)
        except OSError:  # EIO: the terminal's other side closed
            data = b""
        if not data:
            return
        await session._push(stream, data)


def _reader_for_fd(loop: asyncio.AbstractEventLoop, fd: int) -> Any:
    reader = asyncio.StreamReader(limit=READ_SIZE)
    return reader, loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                          os.fdopen(fd, "rb", buffering=0))


class ExecSession(Session):
    kind = "exec"

    def __init__(self, runc: Runc, container_id: str, bundle: str, cmd: list[str], *, tty: bool,
                 stdin: bool) -> None:
        super().__init__()
        self.runc = runc
        self.container_id = container_id
        self.bundle = bundle
        self.cmd = cmd
        self.tty = tty
        self.stdin = stdin
        self.proc: asyncio.subprocess.Process | None = None
        self._master: int | None = None
        self._stdin_writer: asyncio.StreamWriter | None = None
        self._stdin_transport: asyncio.BaseTransport | None = None
        tag = self.id[:16]
        self.process_file = os.path.join(bundle, f"exec-{tag}.json")
        self.pid_file = os.path.join(bundle, f"exec-{tag}.pid")
        self.log_file = os.path.join(bundle, f"exec-{tag}.log")

    def _process_spec(self) -> dict[str, Any]:
        with open(os.path.join(self.bundle, "config.json")) as f:
            spec = json.load(f)["process"]
        spec.update(args=list(self.cmd), terminal=self.tty)
        spec.pop("consoleSize", None)
        return spec

    async def start(self) -> None:
        spec = await asyncio.to_thread(self._process_spec)
        with open(self.process_file, "w") as f:
            json.dump(spec, f)
        args = self.runc.exec_args(self.container_id, self.process_file, self.pid_file)
        at = args.index("exec")
        args[at:at] = ["--log", self.log_file, "--log-format", "json"]
        loop = asyncio.get_running_loop()
        if self.tty:
            master, slave = pty.openpty()
            try:
                tty.setraw(slave)
                self.proc = await asyncio.create_subprocess_exec(
                    *args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            self._master = master
            reader, connect = _reader_for_fd(loop, os.dup(master))
            await connect
            if self.stdin:
                wt, wp = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                       os.fdopen(os.dup(master), "wb", buffering=0))
                self._stdin_writer = asyncio.StreamWriter(wt, wp, None, loop)
            self._tasks.append(asyncio.create_task(_pump(self, "stdout", reader)))
        else:
            self.proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE if self.stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
                limit=READ_SIZE)
            self._stdin_writer = self.proc.stdin
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self._tasks += [asyncio.create_task(_pump(self, "stdout", self.proc.stdout)),
                            asyncio.create_task(_pump(self, "stderr", self.proc.stderr))]
        self._tasks.append(asyncio.create_task(self._wait()))
        log.info("exec_session_started", session=self.id, container_id=self.container_id, tty=self.tty)

    async def _wait(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        pumps = [t for t in self._tasks if t is not asyncio.current_task()]
        if self.tty:
            # The terminal's other side is closed by now; what is left is buffered in it.
            await asyncio.gather(*pumps, return_exceptions=True)
        else:
            await asyncio.gather(*pumps, return_exceptions=True)
        started = conmon.read_pidfile(self.pid_file) is not None
        error = None
        if not started:
            error = _runc_error(self.log_file) or f"runc exec failed with status {code}"
            code = None
        await self._finish(exit_code=code, error=error)
        self._cleanup_files()
        log.info("exec_session_ended", session=self.id, exit_code=code, error=error)

    async def write(self, data: bytes, wait: float) -> dict[str, Any]:
        self.touched = time.monotonic()
        writer = self._stdin_writer
        if writer is None or writer.is_closing():
            return {"written": 0, "closed": True}
        try:
            await asyncio.wait_for(writer.drain(), max(0.0, min(wait, MAX_WAIT)))
        except asyncio.TimeoutError:
            return {"written": 0}
        except (ConnectionError, OSError):
            return {"written": 0, "closed": True}
        writer.write(data)
        return {"written": len(data)}

    async def close_stdin(self) -> None:
        self.touched = time.monotonic()
        writer = self._stdin_writer
        if writer is None or writer.is_closing():
            return
        if self.tty:
            # A terminal has no end of file of its own: send its EOF character, as a user would.
            writer.write(b"\x04")
            return
        writer.close()

    async def resize(self, width: int, height: int) -> None:
        self.touched = time.monotonic()
        if self._master is None or self.proc is None or self.proc.returncode is not None:
            return
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
        try:
            os.kill(self.proc.pid, signal.SIGWINCH)
        except ProcessLookupError:
            pass

    async def _container_pid(self, timeout: float = PID_FILE_WAIT) -> int | None:
        """The exec'd process's pid; runc writes it just after the process starts."""
        deadline = time.monotonic() + timeout
        while True:
            pid = conmon.read_pidfile(self.pid_file)
            if pid or self.proc is None or self.proc.returncode is not None or time.monotonic() > deadline:
                return pid
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            # Kill the process in the container, not runc first: a runc killed before it
            # wrote the pid file would leave its process behind, unknown to anyone.
            pid = await self._container_pid()
            if pid:
                _kill(pid)
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                _kill(self.proc.pid)
                try:
                    await asyncio.wait_for(self.proc.wait(), 5)
                except asyncio.TimeoutError:
                    log.warning("exec_session_unkillable", session=self.id)
        await super().close()
        if self._stdin_writer is not None:
            self._stdin_writer.close()
        if self.proc is not None:
            # Pipes whose readers were cancelled keep the process transport open otherwise.
            transport = getattr(self.proc, "_transport", None)
            if transport is not None:
                transport.close()
        if self._master is not None:
            os.close(self._master)
            self._master = None
        self._cleanup_files()

    def _cleanup_files(self) -> None:
        for path in (self.process_file, self.pid_file, self.log_file):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _runc_error(log_file: str) -> str | None:
    """The last error runc logged (JSON lines)."""
    try:
        with open(log_file, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "fatal") and entry.get("msg"):
            return str(entry["msg"])
    return None


class AttachSession(Session):
    kind = "attach"

    def __init__(self, container_id: str, bundle: str, socket_dir: str, *, tty: bool, stdin: bool,
                 stdin_once: bool) -> None:
        super().__init__()
        self.container_id = container_id
        self.bundle = bundle
        self.socket_dir = socket_dir
        self.tty = tty
        self.stdin = stdin
        self.stdin_once = stdin_once
        self.sock: socket.socket | None = None
        self._send_lock = asyncio.Lock()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        # Reach the socket through a descriptor: its full path may exceed sun_path's 108 bytes.
        try:
            dir_fd = os.open(os.path.join(self.socket_dir, self.container_id), os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            sock.close()
            raise FailedPrecondition(f"container {self.container_id} has no attach socket: {e.strerror}") from None
        try:
            await asyncio.get_running_loop().sock_connect(sock, f"/proc/self/fd/{dir_fd}/attach")
        except OSError as e:
            sock.close()
            raise FailedPrecondition(f"cannot attach to container {self.container_id}: {e.strerror}") from None
        finally:
            os.close(dir_fd)
        self.sock = sock
        self._tasks.append(asyncio.create_task(self._receive()))
        log.info("attach_session_started", session=self.id, container_id=self.container_id)

    async def _receive(self) -> None:
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    packet = await loop.sock_recv(self.sock, READ_SIZE + 1)
                except OSError:
                    break
                if not packet:
                    break
                stream = {ATTACH_STDOUT: "stdout", ATTACH_STDERR: "stderr"}.get(packet[0])
                if stream is not None and len(packet) > 1:
                    await self._push(stream, packet[1:])
        finally:
            await self._finish(exit_code=None)

    async def write(self, data: bytes, wait: float) -> dict[str, Any]:
        self.touched = time.monotonic()
        if self.sock is None or not self.stdin:
            return {"written": 0, "closed": True}
        loop = asyncio.get_running_loop()
        written = 0
        try:
            async with self._send_lock:
                for at in range(0, len(data), STDIN_CHUNK):
                    await asyncio.wait_for(loop.sock_sendall(self.sock, data[at:at + STDIN_CHUNK]),
                                           max(0.1, min(wait, MAX_WAIT)))
                    written = min(len(data), at + STDIN_CHUNK)
        except asyncio.TimeoutError:
            return {"written": written}
        except OSError:
            return {"written": written, "closed": True}
        return {"written": written}

    async def close_stdin(self) -> None:
        self.touched = time.monotonic()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if not self.stdin_once and not self.tty:
            # The container keeps its stdin for the next client: this attach is over.
            await self._finish(exit_code=None)

    async def resize(self, width: int, height: int) -> None:
        self.touched = time.monotonic()
        try:
            conmon.resize(self.bundle, height, width)
        except Exception as e:  # a stopped conmon: nothing left to resize
            log.debug("attach_resize_failed", session=self.id, error=str(e))

    async def close(self) -> None:
        await super().close()
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Sessions:
    """The daemon's live sessions, and the janitor that ends abandoned ones."""

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT, max_sessions: int = MAX_SESSIONS) -> None:
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}
        self._janitor: asyncio.Task[None] | None = None

    async def add(self, session: Any) -> dict[str, Any]:
        if len(self.sessions) >= self.max_sessions:
            raise ResourceExhausted(f"too many streaming sessions (max {self.max_sessions})")
        try:
            await session.start()
        except BaseException:
            await session.close()
            raise
        self.sessions[session.id] = session
        if self._janitor is None or self._janitor.done():
            self._janitor = asyncio.create_task(self._sweep(), name="exec-session-janitor")
        return {"session": session.id}

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"streaming session {session_id} not found (ended or expired)")
        return session

    async def close(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            try:
                await session.close()
            finally:
                self.sessions.pop(session_id, None)

    async def close_all(self) -> None:
        for session_id in list(self.sessions):
            await self.close(session_id)
        if self._janitor is not None:
            self._janitor.cancel()
            await asyncio.gather(self._janitor, return_exceptions=True)

    async def _sweep(self) -> None:
        while self.sessions:
            await asyncio.sleep(min(JANITOR_INTERVAL, self.idle_timeout / 2))
            now = time.monotonic()
            for session_id, session in list(self.sessions.items()):
                if now - session.touched > self.idle_timeout:
                    log.info("streaming_session_abandoned", session=session_id, kind=session.kind)
                    await self.close(session_id)


def sessions_of(owner: Any) -> Sessions:
    """The session registry kept on the daemon object."""
    registry = getattr(owner, "_streaming_sessions", None)
    if registry is None:
        registry = Sessions()
        owner._streaming_sessions = registry
    return registry


def check_streams(cmd: list[Any] | None, *, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    if cmd is not None and (not cmd or not all(isinstance(c, str) and c for c in cmd)):
        raise InvalidArgument("exec command must be a non-empty list of strings")
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout and stderr must be requested")
    if tty and stderr:
        raise InvalidArgument("tty and stderr cannot both be true")
