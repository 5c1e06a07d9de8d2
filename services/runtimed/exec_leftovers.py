"""At start: commands that execs of a runtimed that died left running in their containers are ended.

ExecSync and streaming exec run `runc exec --pid-file <bundle>/exec-<tag>.pid`,
and runtimed removes the exec's files when it ends. A pid file found at start
was left by a runtimed that died during the exec: nobody reads the command's
output or waits for it any more (ExecSync's runc gets no hangup at all; a
streamed exec's command may ignore the one it gets), so the command is killed
with its process group, the way an exec that times out is, and its files go.
"""

from __future__ import annotations

import asyncio
import glob
import os
import signal
from typing import Any

import structlog

from services.runtimed import conmon, process
from services.runtimed.context import Context
from services.runtimed.disk_cleanup import unlink_quiet

log = structlog.get_logger(__name__)

# runc writes the pid file just after it started the command: a process with that pid
# that started later than this after the file was written is another one.
_PID_FILE_SLACK = 2.0


async def end_leftover_execs(ctx: Context) -> None:
    for rec in list(ctx.records.containers.values()):
        bundle = rec.get("bundle")
        if bundle and os.path.isdir(bundle):
            await asyncio.to_thread(_end_in_bundle, rec, bundle)


def _end_in_bundle(rec: dict[str, Any], bundle: str) -> None:
    for pid_file in glob.glob(os.path.join(bundle, "exec-*.pid")):
        pid = conmon.read_pidfile(pid_file)
        if pid and _started_by_runc(pid, pid_file, rec):
            log.warning("leftover_exec_killed", container_id=rec["id"], pid=pid)
            _kill_with_group(pid, rec)
    for path in glob.glob(os.path.join(bundle, "exec-*")):
        unlink_quiet(path)


def _started_by_runc(pid: int, pid_file: str, rec: dict[str, Any]) -> bool:
    """Whether `pid` is still the command runc wrote into the file: alive, started before the
    file was written, and in the container's PID namespace (when the container still runs)."""
    started = process.start_unix_time(pid)
    try:
        written = os.stat(pid_file).st_mtime
    except OSError:
        return False
    if started is None or not process.pid_alive(pid) or started > written + _PID_FILE_SLACK:
        return False
    init = rec.get("pid")
    if init and process.pid_alive(init):
        try:
            return os.stat(f"/proc/{pid}/ns/pid").st_ino == os.stat(f"/proc/{init}/ns/pid").st_ino
        except OSError:
            return False
    return True


def _kill_with_group(pid: int, rec: dict[str, Any]) -> None:
    """SIGKILL the command and, unless it shares it with the container's own processes, its group
    (the shell's children; runc exec's own group when the command has no terminal)."""
    try:
        group = os.getpgid(pid)
    except ProcessLookupError:
        return
    shared = set()
    for other in (rec.get("pid"), rec.get("conmon_pid")):
        try:
            if other:
                shared.add(os.getpgid(other))
        except ProcessLookupError:
            pass
    try:
        if group not in shared and group != os.getpgid(0):
            os.killpg(group, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
