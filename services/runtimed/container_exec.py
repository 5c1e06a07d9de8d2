"""Running commands in a container: ExecSync, and the start of streaming exec and attach sessions.

ExecSync runs `runc exec` to completion and returns its output (at most
EXEC_OUTPUT_LIMIT bytes of each stream). The streaming sessions themselves
are exec_session.py's; their bytes travel on runtimed's stream socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal as signals
from typing import Any

from services.runtimed import conmon, exec_session, exits
from services.runtimed.context import Context
from services.runtimed.disk_cleanup import unlink_quiet
from shared.bus.service import Service
from shared.errors import DeadlineExceeded, InvalidArgument

EXEC_OUTPUT_LIMIT = 16 * 1024 * 1024
# How long a timed-out command may take to die once its process was killed.
KILL_WAIT = 10.0


async def exec_sync(ctx: Context, container_id: str, cmd: list, timeout: float) -> dict[str, Any]:
    """Run `cmd` in the running container; its stdout, stderr and exit code."""
    rec = await exits.running(ctx, container_id)
    if not cmd or not all(isinstance(c, str) for c in cmd):
        raise InvalidArgument("exec command must be a non-empty list of strings")
    with open(os.path.join(rec["bundle"], "config.json")) as f:
        proc_spec = json.load(f)["process"]
    proc_spec.update(args=list(cmd), terminal=False)
    token = secrets.token_hex(8)
    process_file = os.path.join(rec["bundle"], f"exec-{token}.json")
    pid_file = os.path.join(rec["bundle"], f"exec-{token}.pid")
    with open(process_file, "w") as f:
        json.dump(proc_spec, f)
    args = ctx.runc(rec).exec_args(rec["id"], process_file, pid_file)
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        out_task = asyncio.ensure_future(_read_limited(proc.stdout))
        err_task = asyncio.ensure_future(_read_limited(proc.stderr))
        try:
            await asyncio.wait_for(proc.wait(), timeout if timeout and timeout > 0 else None)
        except BaseException as e:
            # Timed out, or the caller's deadline passed (cancelled): nobody waits for it any more.
            await _end(proc, pid_file)
            out_task.cancel()
            err_task.cancel()
            if isinstance(e, asyncio.TimeoutError):
                raise DeadlineExceeded(f"command {cmd[0]!r} timed out after {timeout:g}s") from None
            raise
        stdout = await out_task
        stderr = await err_task
    finally:
        unlink_quiet(process_file)
        unlink_quiet(pid_file)
    return {"stdout": stdout, "stderr": stderr, "exit_code": proc.returncode}


async def _end(proc: asyncio.subprocess.Process, pid_file: str) -> None:
    """Kill an exec's command (it runs in the container, not under runc: by its own pid), then runc."""
    pid = conmon.read_pidfile(pid_file)
    if pid:
        try:
            os.kill(pid, signals.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        await asyncio.wait_for(proc.wait(), KILL_WAIT)
    except asyncio.TimeoutError:
        os.killpg(proc.pid, signals.SIGKILL)
        await proc.wait()


async def _read_limited(stream: asyncio.StreamReader | None, limit: int = EXEC_OUTPUT_LIMIT) -> bytes:
    """Read a stream to its end, keeping at most `limit` bytes."""
    if stream is None:
        return b""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        if size < limit:
            chunks.append(chunk[: limit - size])
            size += len(chunks[-1])
    return b"".join(chunks)


# -- streaming exec and attach (exec_session.py, streamed by shared/bus/streams.py) ------


async def exec_start(ctx: Context, service: Service, container_id: str, cmd: list, tty: bool, stdin: bool,
                     stdout: bool, stderr: bool) -> dict:
    """Start `cmd` in the running container for a streaming exec; {"token"} of its stream."""
    exec_session.check_streams(cmd, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr)
    rec = await exits.running(ctx, container_id)
    return await service.open_stream(exec_session.ExecSession(
        ctx.runc(rec), rec["id"], rec["bundle"], list(cmd), tty=tty, stdin=stdin))


async def attach_start(ctx: Context, service: Service, container_id: str, tty: bool, stdin: bool,
                       stdout: bool, stderr: bool) -> dict:
    """Connect to the running container's stdio through conmon; {"token"} of its stream."""
    exec_session.check_streams(None, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr)
    rec = await exits.running(ctx, container_id)
    return await service.open_stream(exec_session.AttachSession(
        rec["id"], rec["bundle"], ctx.attach_dir, tty=bool(rec.get("tty")), stdin=stdin,
        stdin_once=bool(rec["config"].get("stdin_once"))))
