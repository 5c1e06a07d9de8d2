"""StopPodSandbox: stop every container of the pod (all at once), then its infra process; the pod stays listed."""

from __future__ import annotations

from typing import Any

from services.runtimed import container_stop, exits, sandbox_run
from services.runtimed.context import Context
from services.runtimed.records import SANDBOX_STATES
from shared import faults
from shared.together import together


async def stop(ctx: Context, sandbox_id: str) -> dict[str, Any]:
    """A pod that is unknown (already removed) is success, as the CRI requires: {"id"} is
    the full id stopped, "" when there was none."""
    records = ctx.records
    rec = records.known_sandbox(sandbox_id)
    if rec is None:
        return {"id": ""}
    await together(*(container_stop.stop_record(ctx, c, 0)
                     for c in records.containers_of(rec["id"]) if c["state"] in exits.LIVE))
    faults.point("runtimed.stop_sandbox.after_containers")
    async with records.lock(rec["id"]):
        if rec["state"] not in SANDBOX_STATES:
            return {"id": rec["id"]}
        await sandbox_run.teardown(ctx, rec, remove=False)
        changed = rec["state"] != "notready"
        rec["state"] = "notready"
        await records.save_sandbox(rec)
    if changed:
        ctx.events.emit("sandbox", "stopped", rec["id"], rec["id"])
    return {"id": rec["id"]}
