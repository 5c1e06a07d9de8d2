"""Waiting for helper processes left running by an earlier netd.

Every plugin call and namespace child gets an OWNER_ENV variable naming the
netd state directory. When netd was killed in the middle of a call, the call
goes on running. Start-up lets it finish before rolling back (a plugin killed
half-way may lose track of what it made: bridge learns the addresses whose
masquerade rules it removes from the link it deletes first), and kills it,
with its process group, only when it outlives the CNI timeout.
"""

from __future__ import annotations

import asyncio
import os
import signal

import structlog

log = structlog.get_logger(__name__)

OWNER_ENV = "CRIOPY_NETD_OWNER"


def _owned_pids(owner: str) -> list[int]:
    marker = f"{OWNER_ENV}={owner}".encode()
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def wait_for_orphans(owner: str, timeout: float) -> list[int]:
    """Wait until no process carries this owner's marker, killing those left after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pids = await asyncio.to_thread(_owned_pids, owner)
    if pids:
        log.info("orphan_helpers_waited_for", pids=pids)
    while True:
        alive = [p for p in await asyncio.to_thread(_owned_pids, owner) if _alive(p)]
        if not alive:
            return pids
        if loop.time() >= deadline:
            break
        await asyncio.sleep(0.02)
    for pid in alive:
        log.warning("orphan_helper_killed", pid=pid)
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    give_up = loop.time() + 5.0
    while any(_alive(p) for p in alive) and loop.time() < give_up:
        await asyncio.sleep(0.02)
    return pids
