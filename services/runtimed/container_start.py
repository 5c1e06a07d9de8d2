"""StartContainer: a created container's init execs its process (runc's exec fifo, or `runc start`)."""

from __future__ import annotations

import time
from typing import Any

from services.runtimed import exits
from services.runtimed.context import Context
from shared import faults
from shared.errors import FailedPrecondition


async def start(ctx: Context, container_id: str) -> dict[str, Any]:
    records = ctx.records
    rec = records.container(container_id, visible=True)
    async with records.lock(rec["id"]):
        await exits.refresh(ctx, rec)
        if rec["state"] == "running":
            return {}
        if rec["state"] != "created":
            raise FailedPrecondition(f"container {container_id} is {rec['state']}, not created")
        started_at = time.time_ns()
        await ctx.runc(rec).start(rec["id"], init_pid=rec.get("pid") or 0, init_start=rec.get("pid_start"))
        faults.point("runtimed.start_container.after_runc_start")
        rec.update(state="running", started_at=started_at)
        # Told as the record changes (see exits.mark_exited), before an await lets an exit in.
        ctx.events.emit("container", "started", rec["id"], rec["sandbox_id"])
        await records.save_container(rec, durable=False)
    await exits.refresh(ctx, rec)
    return {}
