"""RemovePodSandbox: remove the pod's containers (reserved ones too; all at once), then everything the pod made."""

from __future__ import annotations

from typing import Any

import structlog

from services.runtimed import container_remove, sandbox_run
from services.runtimed.context import Context
from services.runtimed.records import SANDBOXES
from shared import faults
from shared.together import together

log = structlog.get_logger(__name__)


async def remove(ctx: Context, sandbox_id: str) -> dict[str, Any]:
    """Remove the pod and all its containers, returning the containers' ids so that their
    root file systems can be released; a pod already gone is success."""
    records = ctx.records
    rec = records.known_sandbox(sandbox_id)
    if rec is None:
        return {"id": "", "removed_containers": []}
    containers = records.containers_of(rec["id"])
    await together(*(container_remove.remove_record(ctx, c) for c in containers))
    removed = [c["id"] for c in containers]
    faults.point("runtimed.remove_sandbox.after_containers")
    async with records.lock(rec["id"]):
        if rec["id"] in records.sandboxes:
            rec["state"] = "removing"
            await records.save_sandbox(rec)
            await finish_removal(ctx, rec)
    await records.notify()
    return {"id": rec["id"], "removed_containers": removed}


async def finish_removal(ctx: Context, rec: dict[str, Any]) -> None:
    """Remove a pod marked `removing` (also at start, for a removal a restart cut off)."""
    await sandbox_run.teardown(ctx, rec, remove=True)
    faults.point("runtimed.remove_sandbox.after_teardown")
    await ctx.records.forget(SANDBOXES, rec)
    ctx.events.emit("sandbox", "removed", rec["id"], rec["id"])
    log.info("sandbox_removed", sandbox_id=rec["id"])
