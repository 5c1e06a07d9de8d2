"""StopContainer: the container's stop signal, then SIGKILL after the grace period."""

from __future__ import annotations

from typing import Any

import structlog

from services.runtimed import exits
from services.runtimed.context import Context
from shared.errors import Internal, NotFound

log = structlog.get_logger(__name__)

# How long a container may take to exit after SIGKILL before it is reported stuck.
KILL_WAIT = 30.0


async def stop(ctx: Context, container_id: str, timeout: int) -> dict[str, Any]:
    """Send the stop signal, then SIGKILL after `timeout` seconds. A stopped container is
    fine, and so is an unknown one: the kubelet retries stops after a restart."""
    rec = ctx.records.known_container(container_id)
    if rec is None:
        return {"id": ""}
    await stop_record(ctx, rec, int(timeout or 0))
    return {"id": rec["id"]}


async def stop_record(ctx: Context, rec: dict[str, Any], timeout: int) -> None:
    async with ctx.records.lock(rec["id"]):
        await exits.refresh(ctx, rec)
        if rec["state"] not in exits.LIVE:
            return
        runc = ctx.runc(rec)
        if timeout > 0 and rec["state"] == "running":
            try:
                await runc.kill(rec["id"], rec.get("stop_signal") or "TERM")
            except NotFound:
                pass
            except Internal as e:
                log.warning("container_stop_signal_failed", container_id=rec["id"], error=str(e))
            if await exits.wait_exit(ctx, rec, timeout):
                return
        try:
            await runc.kill(rec["id"], "KILL", all_processes=True)
        except (NotFound, Internal) as e:
            log.info("container_kill_failed", container_id=rec["id"], error=str(e))
        if not await exits.wait_exit(ctx, rec, KILL_WAIT):
            if not exits.conmon_alive(rec):
                exits.note_monitor_gone(rec)
                await exits.mark_exited(ctx, rec, 137, reason="Error", message="killed; conmon is gone")
            else:
                raise Internal(f"container {rec['id']} did not exit after SIGKILL")
