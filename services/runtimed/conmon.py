"""conmon, the per-container monitor: starting it the way CRI-O does, and its control fifo.

conmon runs `runc create` for us, then stays alive as the container's parent:
it copies the container's stdout/stderr into the CRI log file, keeps the attach
socket, writes the exit code into `<exit dir>/<id>` and an `oom` file when the
kernel kills the container for memory.

The hand-shake: conmon waits for one byte on the start pipe (time for us to
put it into its cgroup), double-forks (the process we started exits at once),
runs `runc create` and writes `{"data": <container pid>}` (or a negative
number and a message) on the sync pipe.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import time
from dataclasses import dataclass, field

import structlog

from services.runtimed import process
from services.runtimed.runc import Runc
from shared import programs, tracing
from shared.errors import DeadlineExceeded, Internal

log = structlog.get_logger(__name__)

# How long a conmon may take to end after its container was deleted.
GONE_TIMEOUT = 10.0
_CTL_REOPEN_LOG = 2
_CTL_RESIZE = 1


@dataclass
class ConmonSpec:
    """Everything conmon needs for one container."""

    container_id: str
    name: str
    bundle: str
    log_path: str
    exit_dir: str
    socket_dir: str
    persist_dir: str
    runc: Runc
    monitor_path: str = "/usr/bin/conmon"
    terminal: bool = False
    stdin: bool = False
    stdin_once: bool = False
    log_size_max: int = -1
    log_level: str = "info"
    systemd_cgroup: bool = False
    extra_args: list[str] = field(default_factory=list)

    @property
    def container_pidfile(self) -> str:
        return os.path.join(self.bundle, "pidfile")

    @property
    def conmon_pidfile(self) -> str:
        return os.path.join(self.bundle, "conmon.pid")

    def args(self) -> list[str]:
        args = [
            self.monitor_path, "--api-version", "1",
            "-c", self.container_id,
            "-u", self.container_id,
            "-n", self.name,
            "-r", self.runc.path,
            "-b", self.bundle,
            "-p", self.container_pidfile,
            "-P", self.conmon_pidfile,
            "-l", f"k8s-file:{self.log_path}",
            "--exit-dir", self.exit_dir,
            "--socket-dir-path", self.socket_dir,
            "--persist-dir", self.persist_dir,
            "--log-level", _conmon_level(self.log_level),
        ]
        for arg in self.runc.global_args():
            args += ["--runtime-arg", arg]
        if self.systemd_cgroup:
            args.append("-s")
        if self.log_size_max >= 0:
            args += ["--log-size-max", str(self.log_size_max)]
        if self.terminal:
            args.append("-t")
        elif self.stdin:
            args.append("-i")
            if not self.stdin_once:
                args.append("--leave-stdin-open")
        return args + self.extra_args


def _conmon_level(level: str) -> str:
    level = level.lower()
    return {"warning": "warn", "critical": "fatal"}.get(level, level)


@dataclass
class Started:
    container_pid: int
    conmon_pid: int


async def start(spec: ConmonSpec, *, timeout: float, cgroup_procs: list[str] | None = None) -> Started:
    """Start conmon, which creates the container with runc; return the pids.

    `cgroup_procs`: cgroup.procs files conmon is moved into before it starts work. When the
    creation fails, times out or is cancelled, conmon and whatever it started are killed.
    """
    with tracing.tracer(__name__).start_as_current_span(
            "conmon create", attributes={"criopy.container_id": spec.container_id}):
        return await _start(spec, cgroup_procs, timeout)


async def _start(spec: ConmonSpec, cgroup_procs: list[str] | None, timeout: float) -> Started:
    # conmon dies without writing the exit file when its persist dir is missing.
    os.makedirs(spec.persist_dir, mode=0o700, exist_ok=True)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    start_r, start_w = os.pipe2(os.O_CLOEXEC)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "_OCI_SYNCPIPE": str(sync_w),
        "_OCI_STARTPIPE": str(start_r),
    }
    # The sync pipe is read by the event loop: a read that times out leaves no thread behind.
    sync = await _pipe_reader(sync_r)
    log_file = open(os.path.join(spec.bundle, "conmon.log"), "ab")
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.args(), stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                env=env, cwd=spec.bundle, pass_fds=(sync_w, start_r), start_new_session=True)
        except OSError as e:
            sync.transport.close()
            os.close(start_w)
            raise Internal(f"cannot start conmon: {e.strerror}") from None
    finally:
        log_file.close()
        os.close(sync_w)
        os.close(start_r)
    try:
        try:
            for procs in cgroup_procs or []:
                _join_cgroup(procs, proc.pid)
            os.write(start_w, b"\0")
            os.close(start_w)
            start_w = -1
            async with asyncio.timeout(timeout):
                await proc.wait()
                if proc.returncode != 0:
                    detail = _tail(os.path.join(spec.bundle, "conmon.log"))
                    raise Internal(f"conmon exited with status {proc.returncode}: {detail}")
                message = await _read_sync(sync.reader)
        except TimeoutError:
            if proc.returncode is None:
                raise DeadlineExceeded(f"conmon did not start within {timeout:g}s") from None
            raise DeadlineExceeded(f"container {spec.container_id} was not created within {timeout:g}s "
                                   "(conmon and runc were killed)") from None
        finally:
            if start_w >= 0:
                os.close(start_w)
            sync.transport.close()
        pid = message.get("data", message.get("pid", -1))
        if not isinstance(pid, int) or pid <= 0:
            text = str(message.get("message") or "no reason given")
            raise Internal(f"creating container {spec.container_id}: {text.strip()}")
        conmon_pid = read_pidfile(spec.conmon_pidfile)
        if conmon_pid is None:
            raise Internal(f"conmon of {spec.container_id} wrote no pid file")
    except BaseException:
        await _kill(proc, spec.conmon_pidfile)
        raise
    return Started(container_pid=pid, conmon_pid=conmon_pid)


async def _kill(proc: asyncio.subprocess.Process, conmon_pidfile: str) -> None:
    """Kill a conmon whose creation failed or was given up on, with the `runc create` it runs.

    The process we started ends once conmon has forked; the conmon that goes on leads a
    session of its own (its pid in the pid file), where runc and its helpers run too.
    """
    await programs.kill_and_reap(proc)
    monitor = read_pidfile(conmon_pidfile)
    if monitor:
        programs.kill_group(monitor)
        await wait_gone(monitor, None, timeout=programs.REAP_TIMEOUT)


@dataclass
class _PipeReader:
    reader: asyncio.StreamReader
    transport: asyncio.ReadTransport  # closing it closes the pipe


async def _pipe_reader(fd: int) -> _PipeReader:
    """The read end of a pipe as a stream of the event loop; it owns `fd` from now on."""
    pipe = os.fdopen(fd, "rb", buffering=0)
    reader = asyncio.StreamReader()
    try:
        transport, _protocol = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe)
    except BaseException:
        pipe.close()
        raise
    return _PipeReader(reader, transport)


async def _read_sync(reader: asyncio.StreamReader) -> dict:
    """Read the first JSON object conmon writes on the sync pipe."""
    buf = b""
    decoder = json.JSONDecoder()
    while True:
        chunk = await reader.read(4096)
        if not chunk:
            break
        buf += chunk
        try:
            obj, _ = decoder.raw_decode(buf.decode(errors="replace").strip())
            return obj if isinstance(obj, dict) else {}
        except ValueError:
            continue
    if buf.strip():
        try:
            obj, _ = decoder.raw_decode(buf.decode(errors="replace").strip())
            return obj if isinstance(obj, dict) else {}
        except ValueError:
            pass
    return {"data": -1, "message": "conmon closed the sync pipe without a result"}


def _join_cgroup(procs_file: str, pid: int) -> None:
    try:
        with open(procs_file, "w") as f:
            f.write(str(pid))
    except OSError as e:
        log.warning("conmon_cgroup_join_failed", path=procs_file, error=e.strerror)


def _tail(path: str, size: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


async def wait_gone(pid: int | None, start: int | None, timeout: float = GONE_TIMEOUT) -> None:
    """Wait for a conmon to end (it does once runc deleted its container); SIGKILL it after `timeout`.

    `start`: its start time, so that a reused pid is not mistaken for it.
    """
    if not pid:
        return
    deadline = time.monotonic() + timeout
    while process.still_running(pid, start):
        if time.monotonic() > deadline:
            log.warning("conmon_killed", pid=pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        await asyncio.sleep(0.02)


def read_pidfile(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def control(bundle: str, message: int, a: int = 0, b: int = 0) -> None:
    """Write one message on conmon's control fifo (`ctl` in the bundle)."""
    path = os.path.join(bundle, "ctl")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENOENT):
            raise Internal("conmon is not running for this container") from None
        raise Internal(f"cannot open conmon's control fifo: {e.strerror}") from None
    try:
        os.write(fd, f"{message} {a} {b}\n".encode())
    finally:
        os.close(fd)


def reopen_log(bundle: str) -> None:
    control(bundle, _CTL_REOPEN_LOG)


def resize(bundle: str, height: int, width: int) -> None:
    control(bundle, _CTL_RESIZE, height, width)


def read_exit_file(path: str) -> int | None:
    """The exit code conmon wrote, or None while the container runs."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None
