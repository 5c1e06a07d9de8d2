"""RemoveContainer: stop it if needed, delete the runc container, its files and its record."""

from __future__ import annotations

import asyncio
import os
import shutil
from typing import Any

import structlog

from services.runtimed import cgroups, conmon, container_stop, exits
from services.runtimed.context import Context
from services.runtimed.disk_cleanup import unlink_quiet
from services.runtimed.records import CONTAINERS
from shared import faults

log = structlog.get_logger(__name__)


async def remove(ctx: Context, container_id: str) -> dict[str, Any]:
    """Stop (if needed) and remove the container; one already gone is success.
    {"id"}: the full id removed, "" when there was none."""
    rec = ctx.records.known_container(container_id)
    if rec is None:
        return {"id": ""}
    await remove_record(ctx, rec)
    await ctx.records.notify()
    return {"id": rec["id"]}


async def remove_record(ctx: Context, rec: dict[str, Any]) -> None:
    if rec["state"] in exits.LIVE:
        await container_stop.stop_record(ctx, rec, 0)
    async with ctx.records.lock(rec["id"]):
        if rec["id"] not in ctx.records.containers:
            return
        rec["state"] = "removing"
        await ctx.records.save_container(rec)
        await finish_removal(ctx, rec)


async def finish_removal(ctx: Context, rec: dict[str, Any]) -> None:
    """Remove a container marked `removing` (also at start, for a removal a restart cut off)."""
    await ctx.runc(rec).delete(rec["id"], force=True)
    faults.point("runtimed.remove_container.after_runc_delete")
    await conmon.wait_gone(rec.get("conmon_pid"), rec.get("conmon_start"))
    await remove_files(ctx, rec)
    await ctx.records.forget(CONTAINERS, rec)
    ctx.events.emit("container", "removed", rec["id"], rec["sandbox_id"], name=rec["name"])
    log.info("container_removed", container_id=rec["id"])


async def remove_files(ctx: Context, rec: dict[str, Any]) -> None:
    """The container's exit file, attach directory, bundle, and conmon's cgroup; absence is fine."""
    unlink_quiet(os.path.join(ctx.exit_dir, rec["id"]))
    unlink_quiet(os.path.join(ctx.attach_dir, rec["id"]))
    if rec.get("bundle"):
        await asyncio.to_thread(shutil.rmtree, rec["bundle"], ignore_errors=True)
    if rec.get("conmon_cgroup_dirs"):
        # conmon has exited: its cgroup is empty, and removing it is quick.
        await cgroups.remove_dirs(rec["conmon_cgroup_dirs"], timeout=0.5)
        rec["conmon_cgroup_dirs"] = []
