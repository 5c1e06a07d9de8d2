"""Containers' exits: conmon's exit files read into the records, and monitors (conmon) that died.

conmon writes a container's exit code into `<exit dir>/<id>` when the
container's process ends (and an `oom` file when the kernel killed it for
memory). runtimed reads it whenever it looks at a container, and
exit_watcher.py is told by inotify as soon as it is written, so that the exit
event goes out even when nobody asks, and a stop returns at once.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import structlog

from services.runtimed import conmon, process
from services.runtimed.context import Context
from shared import metrics
from shared.errors import FailedPrecondition

log = structlog.get_logger(__name__)

LIVE = ("created", "running")


def conmon_alive(rec: dict[str, Any], *, lenient: bool = False) -> bool:
    """Whether the container's conmon still runs (the same process, not a reused pid).

    `lenient`: a conmon known only from its pid file (a create cut off before
    its pid was recorded) counts as alive when that pid is.
    """
    pid = rec.get("conmon_pid")
    if not pid:
        pid = conmon.read_pidfile(os.path.join(rec.get("bundle", ""), "conmon.pid"))
        if not pid:
            return False
        return process.pid_alive(pid) if lenient else False
    return process.still_running(pid, rec.get("conmon_start"))


async def refresh(ctx: Context, rec: dict[str, Any]) -> None:
    """Pick up the container's exit from conmon's exit file."""
    if rec["state"] not in LIVE:
        return
    path = os.path.join(ctx.exit_dir, rec["id"])
    code = conmon.read_exit_file(path)
    if code is None:
        return
    try:
        finished = os.stat(path).st_mtime_ns
    except OSError:
        finished = time.time_ns()
    await mark_exited(ctx, rec, code, finished_at=finished)


async def mark_exited(ctx: Context, rec: dict[str, Any], code: int, *, finished_at: int | None = None,
                      reason: str | None = None, message: str = "") -> None:
    if rec["state"] not in LIVE:
        return
    oom = any(os.path.exists(os.path.join(rec.get("bundle", ""), p)) for p in ("oom", "persist/oom"))
    if reason is None:
        reason = "OOMKilled" if oom else ("Completed" if code == 0 else "Error")
    finished_at = max(finished_at or time.time_ns(), rec.get("started_at") or 0)
    rec.update(state="exited", exit_code=code, finished_at=finished_at,
               reason=reason, message=message, oom=oom)
    if not rec.get("started_at"):
        rec["started_at"] = 0
    # Told as the record changes, before the save's await lets another call (a removal) move
    # it on: the event then carries the status that readers of the record saw.
    log.info("container_exited", container_id=rec["id"], exit_code=code, reason=reason)
    if oom:
        ctx.events.emit("container", "oom", rec["id"], rec["sandbox_id"], name=rec["name"])
    ctx.events.emit("container", "exited", rec["id"], rec["sandbox_id"], exit_code=code)
    await ctx.records.save_container(rec)


async def running(ctx: Context, container_id: str) -> dict[str, Any]:
    """The record of a running container, its exit read first; FailedPrecondition when it is not running."""
    rec = ctx.records.container(container_id, visible=True)
    await refresh(ctx, rec)
    if rec["state"] != "running":
        raise FailedPrecondition(f"container {container_id} is not running")
    return rec


def note_monitor_gone(rec: dict[str, Any]) -> None:
    """A container's conmon died under it: said once, in the log and CRI-O's metric."""
    if rec.get("monitor_gone"):
        return
    rec["monitor_gone"] = True
    log.warning("container_monitor_gone", container_id=rec["id"], conmon_pid=rec.get("conmon_pid"))
    metrics.CRIO_CONTAINERS_STOPPED_MONITOR.labels(rec["name"]).inc()


async def wait_file(path: str, timeout: float) -> bool:
    """Whether `path` appeared within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def wait_exit_file(ctx: Context, name: str, timeout: float) -> bool:
    """Whether the exit file `name` (a container's id, or a pod's for its infra process) appeared
    within `timeout` seconds."""
    path = os.path.join(ctx.exit_dir, name)
    deadline = time.monotonic() + timeout
    while True:
        with ctx.exit_notices.expect(name) as seen:
            if os.path.exists(path):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await ctx.exit_notices.wait(seen, left)


async def wait_exit(ctx: Context, rec: dict[str, Any], timeout: float) -> bool:
    """Whether the container exited within `timeout` seconds; returns as soon as its exit file is written."""
    deadline = time.monotonic() + timeout
    while True:
        with ctx.exit_notices.expect(rec["id"]) as seen:
            await refresh(ctx, rec)
            if rec["state"] == "exited":
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await ctx.exit_notices.wait(seen, left)
