"""Streaming exec and attach sessions: processes whose stdio is streamed to the frontend.

A session is started by a bus call (`exec_start`, `attach_start`) and then
served on its own stream (shared/bus/streams.py): output frames as the process
writes, input as the frontend sends it, a resize for a terminal, and an end
with the exit code.

Exec runs `runc exec` for a process spec built from the container's own
(environment, user, capabilities, cwd) with the requested command, under a
parent-death signal: should runtimed die, the process gets a hangup. With a
terminal, runc gets a pseudo-terminal of ours as its stdio and relays it to
the container's terminal; a resize sets our terminal's size and sends runc
SIGWINCH, which runc copies to the container's terminal. Without one, plain
pipes.

Attach connects to conmon's attach socket (`<attach dir>/<id>/attach`, a
SOCK_SEQPACKET socket): each packet from conmon is one byte naming the pipe
(2 stdout, 3 stderr) then data; what we send goes to the container's stdin;
shutting down our write side tells conmon that stdin ended. Resizes go through
conmon's control fifo.

Output is read only as fast as the stream takes it: a client that stops
reading stops the process (its writes block), not the daemon's memory. A
session ends with its process, or when its frontend goes away (the process is
killed), or when no frontend claims it (see the stream listener).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
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
from shared.bus.stream_frames import READ_SIZE, STDERR, STDOUT, End
from shared.bus.streams import DaemonStream
from shared.errors import FailedPrecondition, InvalidArgument

log = structlog.get_logger(__name__)

ATTACH_PACKET = 32 * 1024
STDIN_CHUNK = 8192  # conmon reads its attach socket 8 KiB at a time
PID_FILE_WAIT = 5.0
SETPRIV = "/usr/bin/setpriv"
ATTACH_STDOUT = 2
ATTACH_STDERR = 3


def _reader_for_fd(loop: asyncio.AbstractEventLoop, fd: int) -> Any:
    reader = asyncio.StreamReader(limit=READ_SIZE)
    return reader, loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                          os.fdopen(fd, "rb", buffering=0))


class ExecSession:
    kind = "exec"

    def __init__(self, runc: Runc, container_id: str, bundle: str, cmd: list[str], *, tty: bool,
                 stdin: bool) -> None:
        self.runc = runc
        self.container_id = container_id
        self.bundle = bundle
        self.cmd = cmd
        self.tty = tty
        self.stdin = stdin
        self.proc: asyncio.subprocess.Process | None = None
        self._master: int | None = None
        self._outputs: list[tuple[int, asyncio.StreamReader]] = []
        self._stdin_writer: asyncio.StreamWriter | None = None
        tag = os.urandom(8).hex()
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
        # Should runtimed die without ending the session, runc gets SIGHUP and passes it on to the
        # process, as a terminal's hangup would: nobody is left to read it or to kill it.
        args = [SETPRIV, "--pdeathsig", "HUP", *args]
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
            self._outputs = [(STDOUT, reader)]
        else:
            self.proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE if self.stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
                limit=READ_SIZE)
            self._stdin_writer = self.proc.stdin
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self._outputs = [(STDOUT, self.proc.stdout), (STDERR, self.proc.stderr)]
        log.info("exec_session_started", container_id=self.container_id, tty=self.tty, pid=self.proc.pid)

    async def serve(self, stream: DaemonStream) -> End:
        assert self.proc is not None
        pumps = [asyncio.create_task(stream.copy_output(reader, kind)) for kind, reader in self._outputs]
        feeder = asyncio.create_task(self._feed(stream)) if self._stdin_writer is not None else None
        try:
            code: int | None = await self.proc.wait()
            # What the process wrote last is still in the pipes (or the terminal).
            await asyncio.gather(*pumps)
        finally:
            for task in (*pumps, feeder):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*pumps, *([feeder] if feeder else []), return_exceptions=True)
        error = None
        if conmon.read_pidfile(self.pid_file) is None:
            error = _runc_error(self.log_file) or f"runc exec failed with status {code}"
            code = None
        self._cleanup_files()
        log.info("exec_session_ended", container_id=self.container_id, exit_code=code, error=error)
        return End(exit_code=code, error=error)

    async def _feed(self, stream: DaemonStream) -> None:
        writer = self._stdin_writer
        assert writer is not None
        if not await stream.copy_input(writer):
            return
        try:
            if self.tty:
                # A terminal has no end of file of its own: send its EOF character, as a user would.
                writer.write(b"\x04")
                await writer.drain()
            else:
                writer.close()
        except (ConnectionError, OSError):
            pass

    def resize(self, width: int, height: int) -> None:
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
                    log.warning("exec_session_unkillable", container_id=self.container_id, pid=self.proc.pid)
        if self._stdin_writer is not None:
            self._stdin_writer.close()
            self._stdin_writer = None
        if self.proc is not None:
            # Pipes nobody reads any more keep the process transport open otherwise.
            transport = getattr(self.proc, "_transport", None)
            if transport is not None:
                transport.close()
        if self._master is not None:
            for _kind, reader in self._outputs:
                transport = getattr(reader, "_transport", None)
                if transport is not None:
                    transport.close()
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


class AttachSession:
    kind = "attach"

    def __init__(self, container_id: str, bundle: str, socket_dir: str, *, tty: bool, stdin: bool,
                 stdin_once: bool) -> None:
        self.container_id = container_id
        self.bundle = bundle
        self.socket_dir = socket_dir
        self.tty = tty
        self.stdin = stdin
        self.stdin_once = stdin_once
        self.sock: socket.socket | None = None

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
        log.info("attach_session_started", container_id=self.container_id)

    async def serve(self, stream: DaemonStream) -> End:
        receiver = asyncio.create_task(self._receive(stream))
        feeder = asyncio.create_task(self._feed(stream)) if self.stdin else None
        try:
            if feeder is not None and not self.stdin_once and not self.tty:
                # The container keeps its stdin for the next client: this attach is over when our stdin ends.
                await asyncio.wait({receiver, feeder}, return_when=asyncio.FIRST_COMPLETED)
            else:
                await receiver
        finally:
            for task in (receiver, feeder):
                if task is not None:
                    task.cancel()
            await asyncio.gather(receiver, *([feeder] if feeder else []), return_exceptions=True)
        return End()

    async def _receive(self, stream: DaemonStream) -> None:
        """conmon's packets to the stream, until conmon closes the socket (the container ended)."""
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                packet = await loop.sock_recv(self.sock, ATTACH_PACKET + 1)
            except OSError:
                return
            if not packet:
                return
            kind = {ATTACH_STDOUT: STDOUT, ATTACH_STDERR: STDERR}.get(packet[0])
            if kind is not None and len(packet) > 1:
                try:
                    await stream.send(kind, packet[1:])
                except (ConnectionError, OSError):
                    return

    async def _feed(self, stream: DaemonStream) -> None:
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        try:
            while data := await stream.receive():
                for at in range(0, len(data), STDIN_CHUNK):
                    await loop.sock_sendall(self.sock, data[at:at + STDIN_CHUNK])
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            while await stream.receive():  # the container's stdin is gone
                pass

    def resize(self, width: int, height: int) -> None:
        try:
            conmon.resize(self.bundle, height, width)
        except Exception as e:  # a stopped conmon: nothing left to resize
            log.debug("attach_resize_failed", container_id=self.container_id, error=str(e))

    async def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def check_streams(cmd: list[Any] | None, *, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    if cmd is not None and (not cmd or not all(isinstance(c, str) and c for c in cmd)):
        raise InvalidArgument("exec command must be a non-empty list of strings")
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout and stderr must be requested")
    if tty and stderr:
        raise InvalidArgument("tty and stderr cannot both be true")
