"""Running an external program asynchronously, with a timeout.

The program gets a session (and so a process group) of its own: a timeout or
a cancelled caller kills the whole group, helpers it started included, and
the program is always reaped.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass

from shared.errors import DeadlineExceeded, Internal

# How long a killed program may take to be reaped before we stop waiting for it.
REAP_TIMEOUT = 5.0


@dataclass
class Completed:
    args: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes


async def run(args: list[str], *, timeout: float, input: bytes | None = None,
              env: dict[str, str] | None = None, cwd: str | None = None) -> Completed:
    """Run `args` to completion, its output collected.

    Raises Internal when the program cannot be started, DeadlineExceeded when
    `timeout` passes (the program is killed first).
    """
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
        await kill_and_reap(proc)
        if isinstance(e, asyncio.CancelledError):
            raise
        raise DeadlineExceeded(
            f"{os.path.basename(args[0])} {_short(args[1:])} did not finish within {timeout:g}s") from None
    return Completed(args, proc.returncode if proc.returncode is not None else -1, stdout, stderr)


def kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` leads; one already gone is fine."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def kill_and_reap(proc: asyncio.subprocess.Process, timeout: float = REAP_TIMEOUT) -> None:
    """Kill a program started in a session of its own, and its group; wait for it to be reaped."""
    kill_group(proc.pid)
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        pass


def _short(args: list[str]) -> str:
    text = " ".join(args)
    return text if len(text) < 120 else text[:117] + "..."
