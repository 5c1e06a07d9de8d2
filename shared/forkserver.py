"""Services forked from one process that imported their common modules once (`criopy run` only).

Each service still runs as a process of its own, started as `criopy service
NAME` would start it (its own configuration load, identity, privileges,
logs); but instead of a new interpreter importing everything again, the
supervisor forks, before it sets anything up, a small fork server holding
the modules every service imports, kept out of the garbage collector's reach
(`gc.freeze`): the services forked from it share those pages copy-on-write
and the machine holds them once. The systemd units start each service alone,
as before.

The supervisor asks for a service with a line of JSON on a socket pair (its
arguments and the environment it adds) and gets its pid back; the server is
the services' parent, reaps them and tells each exit status. It lives as long
as the supervisor, so a restarted service is forked too. Should it die, the
services it forked are watched through pidfds (their exit status is then
unknown) and the supervisor starts new ones as new interpreters.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import traceback
from typing import Sequence

import structlog

from shared import malloc
from shared.libc import libc

log = structlog.get_logger(__name__)

# What more than one service imports; a module only one service uses is better imported by that service
# alone: the pages it touches would otherwise be copied out of the shared ones, and held twice.
COMMON_MODULES = (
    "asyncio", "json", "msgpack", "structlog", "zmq", "zmq.asyncio", "tenacity",
    "opentelemetry.trace",
    "shared.cli", "shared.daemon", "shared.bus.client", "shared.bus.streams", "shared.programs",
    "shared.mounts", "shared.mountinfo", "shared.atomic", "shared.keyed_locks",
    "shared.bus.feed", "shared.quarantine", "shared.short_ids",
)

_PR_SET_NAME = 15
UNKNOWN_EXIT = -1  # the status of a service whose fork server died before it


class ForkedProcess:
    """A service forked by the server, with what the supervisor uses of asyncio's Process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._exited.set_result(code)


class ForkServer:
    """The supervisor's end: `start()` before the event loop, then `spawn(argv)` from it."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._listening: asyncio.Task[None] | None = None
        self._pending: list[asyncio.Future[int]] = []
        self._processes: dict[int, ForkedProcess] = {}
        self._lock: asyncio.Lock | None = None
        self._closing = False
        self.alive = True

    @classmethod
    def start(cls, preload: Sequence[str] = COMMON_MODULES) -> "ForkServer":
        """Import `preload` and fork the server; call it while this process has a single thread."""
        # No collection meanwhile: the holes it would leave in pages shared with the services would be
        # filled by their first allocations, each copying a page (see gc.freeze's documentation).
        gc.disable()
        for name in preload:
            importlib.import_module(name)
        gc.freeze()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            ours.close()
            code = 1
            try:
                code = _serve(theirs)
            finally:
                os._exit(code)
        theirs.close()
        # They stay frozen here too: a collection walking them would copy their pages out of the shared ones.
        gc.enable()
        return cls(pid, ours)

    async def spawn(self, argv: list[str], env: dict[str, str]) -> ForkedProcess:
        """A service running `criopy` with `argv` (e.g. [..., "service", "netd"]), `env` added to its environment."""
        if self._lock is None:
            self._lock = asyncio.Lock()
            self._reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
            self._listening = asyncio.create_task(self._listen(), name="forkserver")
        assert self._writer is not None
        async with self._lock:  # replies come in the order of the requests
            if not self.alive:
                raise ConnectionError("the fork server is gone")
            answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._pending.append(answer)
            self._writer.write(json.dumps({"argv": argv, "env": env}).encode() + b"\n")
            await self._writer.drain()
            pid = await answer
        process = self._processes.setdefault(pid, ForkedProcess(pid))
        return process

    async def _listen(self) -> None:
        assert self._reader is not None
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "pid" in message:
                    pid = message["pid"]
                    self._processes.setdefault(pid, ForkedProcess(pid))
                    self._pending.pop(0).set_result(pid)
                elif "exited" in message:
                    process = self._processes.pop(message["exited"], None)
                    if process is not None:
                        process.exited(message["code"])
        except (OSError, ValueError) as e:
            log.error("forkserver_unreadable", error=str(e))
        self._gone()

    def _gone(self) -> None:
        """The server ended: its services are watched by pidfd from now on."""
        if not self.alive:
            return
        self.alive = False
        if self._closing:
            log.info("forkserver_closed", pid=self.pid)
        else:
            log.warning("forkserver_gone", pid=self.pid, services=sorted(self._processes))
        for answer in self._pending:
            if not answer.done():
                answer.set_exception(ConnectionError("the fork server is gone"))
        self._pending.clear()
        loop = asyncio.get_running_loop()
        for pid, process in list(self._processes.items()):
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                process.exited(UNKNOWN_EXIT)
                continue

            def ended(fd: int = fd, process: ForkedProcess = process) -> None:
                loop.remove_reader(fd)
                os.close(fd)
                process.exited(UNKNOWN_EXIT)

            loop.add_reader(fd, ended)
        self._processes.clear()
        # It closed its socket as it exited; it may not have quite ended yet.
        loop.run_in_executor(None, _reap, self.pid, True)

    async def close(self) -> None:
        """Stop the server (once the supervisor stopped the services): it exits when its end of the socket closes."""
        if self._closing:
            return
        self._closing = True
        if self._writer is not None:
            self._writer.write_eof()
        else:
            self._sock.close()
        if self._listening is not None:
            await asyncio.gather(self._listening, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
        await asyncio.to_thread(_reap, self.pid, True)


def _reap(pid: int, wait: bool = False) -> None:
    try:
        os.waitpid(pid, 0 if wait else os.WNOHANG)
    except ChildProcessError:
        pass


# -- the server ------------------------------------------------------------------


def _serve(sock: socket.socket) -> int:
    """Fork a service for each request; tell each pid, and each exit status, in order."""
    os.setpgid(0, 0)  # a Ctrl-C at the supervisor's terminal is the supervisor's to handle
    _name(b"criopy-forks")
    malloc.trim()  # what the imports freed: the services need not inherit it
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    buffer = b""
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_r:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                _tell_exits(sock)
                continue
            data = sock.recv(65536)
            if not data:
                return 0  # the supervisor is gone or done
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    for fd in (wake_r, wake_w):
                        os.close(fd)
                    selector.close()
                    sock.close()
                    os._exit(_service(request["argv"], request.get("env", {})))
                try:
                    os.setpgid(pid, pid)  # here too: its group is its own before its pid is told
                except ProcessLookupError:
                    pass  # it ended already; its exit is told next
                sock.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        _tell_exits(sock)


def _tell_exits(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.sendall(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


def _service(argv: list[str], env: dict[str, str]) -> int:
    """In the forked child: run `criopy` with `argv` as a new process would, and return its exit status."""
    signal.set_wakeup_fd(-1)
    gc.enable()  # the server never collects
    os.environ.update(env)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    os.setpgid(0, 0)
    if "service" in argv[:-1]:
        _name(f"criopy-{argv[-1]}".encode()[:15])
    code = 1
    try:
        from shared import cli

        code = cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    return code


def _name(name: bytes) -> None:
    """The process's name as `ps` and `top` show it (its command line stays the supervisor's)."""
    try:
        libc().prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    except OSError:
        pass

