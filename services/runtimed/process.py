"""Running an external program asynchronously, with a timeout."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass

import structlog

from shared.errors import DeadlineExceeded, Internal

log = structlog.get_logger(__name__)


@dataclass
class Completed:
    args: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes


async def run(args: list[str], *, timeout: float, input: bytes | None = None,
              env: dict[str, str] | None = None, cwd: str | None = None) -> Completed:
    """Run `args` to completion; kill it (and its process group) when `timeout` passes."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, cwd=cwd, start_new_session=True)
    except OSError as e:
        raise Internal(f"cannot run {args[0]}: {e.strerror}") from None
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(input), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError) as e:
        _kill_group(proc.pid)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            pass
        if isinstance(e, asyncio.CancelledError):
            raise
        raise DeadlineExceeded(f"{os.path.basename(args[0])} {_short(args[1:])} did not finish within {timeout:g}s") from None
    return Completed(args, proc.returncode if proc.returncode is not None else -1, stdout, stderr)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _short(args: list[str]) -> str:
    text = " ".join(args)
    return text if len(text) < 120 else text[:117] + "..."


def pid_alive(pid: int) -> bool:
    """Whether a process exists (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return False


def process_start_time(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot, to tell reused pids apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
