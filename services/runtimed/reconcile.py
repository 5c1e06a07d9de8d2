"""At start: finish or undo what a previous run left in flight, and pick up what happened meanwhile.

A pod or container being made is undone (back to reserved: the frontend's
retry makes it again), unless its container was in fact created, which is
then finished; a container started just before the restart is recorded
running; a removal is finished; an exit while runtimed was down is read
from conmon's exit file (or, when conmon died too, recorded as an error); a
runc container no record knows is deleted. Pods and containers whose record
was lost are given one first (recovery.py). A record whose reconciling fails
is logged and left as it is: runtimed never fails to start over one record.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, AsyncIterator

import structlog

from services.runtimed import conmon, container_create, container_remove, exits, infra, process, recovery, \
    sandbox_remove, sandbox_run
from services.runtimed.context import Context
from shared.errors import Internal

log = structlog.get_logger(__name__)


async def reconcile(ctx: Context) -> None:
    await recovery.recover(ctx)
    records = ctx.records
    for rec in list(records.sandboxes.values()):
        async with _each("sandbox", rec):
            if rec["state"] == "creating":
                log.info("sandbox_undo_in_flight", sandbox_id=rec["id"])
                await sandbox_run.teardown(ctx, rec, remove=True)
                rec["state"] = "reserved"
                await records.save_sandbox(rec)
            elif rec["state"] == "removing":
                await sandbox_remove.finish_removal(ctx, rec)
    for rec in list(records.containers.values()):
        async with _each("container", rec):
            await _reconcile_container(ctx, rec)
    for rec in records.sandboxes.values():
        if rec.get("infra") and rec["state"] == "ready":
            infra.check(ctx, rec)
    await _delete_orphans(ctx)


@contextlib.asynccontextmanager
async def _each(kind: str, rec: dict[str, Any]) -> AsyncIterator[None]:
    """Reconcile one record; its failure is logged, and the others go on."""
    try:
        yield
    except Exception as e:
        log.exception(f"{kind}_reconcile_failed", id=rec.get("id"), state=rec.get("state"), error=str(e))


async def _reconcile_container(ctx: Context, rec: dict[str, Any]) -> None:
    state = rec["state"]
    if state == "creating":
        await _reconcile_creating(ctx, rec)
    elif state == "removing":
        await container_remove.finish_removal(ctx, rec)
    elif state in exits.LIVE:
        await exits.refresh(ctx, rec)
        if rec["state"] == "created":
            await _reconcile_started(ctx, rec)
        if rec["state"] in exits.LIVE and not exits.conmon_alive(rec):
            exits.note_monitor_gone(rec)
            st = await ctx.runc(rec).state(rec["id"])
            if st is None or st.get("status") == "stopped":
                await exits.mark_exited(ctx, rec, 255, reason="Error",
                                        message="the container's monitor (conmon) is gone")


async def _reconcile_creating(ctx: Context, rec: dict[str, Any]) -> None:
    st = await ctx.runc(rec).state(rec["id"])
    if st is not None and st.get("status") == "created" and exits.conmon_alive(rec, lenient=True):
        pid = int(st.get("pid") or 0)
        conmon_pid = conmon.read_pidfile(os.path.join(rec["bundle"], "conmon.pid"))
        rec.update(state="created", pid=pid, pid_start=process.process_start_time(pid),
                   conmon_pid=conmon_pid, conmon_start=process.process_start_time(conmon_pid or 0),
                   created_at=rec.get("created_at") or time.time_ns())
        log.info("container_create_finished_after_restart", container_id=rec["id"])
        await ctx.records.save_container(rec)
        ctx.events.emit("container", "created", rec["id"], rec["sandbox_id"])
        return
    log.info("container_undo_in_flight", container_id=rec["id"])
    await container_create.undo(ctx, rec)
    rec["state"] = "reserved"
    await ctx.records.save_container(rec)


async def _reconcile_started(ctx: Context, rec: dict[str, Any]) -> None:
    """A start cut off by a restart after `runc start`: the record says created, the container runs."""
    st = await ctx.runc(rec).state(rec["id"])
    if st is None or st.get("status") != "running":
        return
    rec.update(state="running", started_at=time.time_ns())
    log.info("container_start_finished_after_restart", container_id=rec["id"])
    # Told as the record changes (see exits.mark_exited).
    ctx.events.emit("container", "started", rec["id"], rec["sandbox_id"])
    await ctx.records.save_container(rec)


async def _delete_orphans(ctx: Context) -> None:
    """Delete runc containers in our own runc root that no record knows (never leak one)."""
    runc = ctx.runc_for("")
    if not os.path.isdir(runc.root):
        return
    # A reserved record has no runc container yet: one with its id is left
    # from a create that was interrupted, and is deleted like any orphan.
    known = ({i for i, r in ctx.records.containers.items() if r["state"] != "reserved"}
             | {i for i, r in ctx.records.sandboxes.items() if r.get("infra")})
    for container_id in os.listdir(runc.root):
        if container_id not in known:
            log.warning("orphan_container_deleted", container_id=container_id)
            try:
                await runc.delete(container_id, force=True)
            except Internal as e:
                log.error("orphan_delete_failed", container_id=container_id, error=str(e))
