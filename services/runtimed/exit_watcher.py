"""The task that notices exits nobody asked about: live containers' exit files and pods' infra processes."""

from __future__ import annotations

import asyncio

import structlog

from services.runtimed import exits, infra
from services.runtimed.context import Context

log = structlog.get_logger(__name__)

POLL_INTERVAL = 0.25
# Monitors die rarely: looked for every few seconds, not at every poll.
MONITOR_CHECK_TICKS = 8


async def watch(ctx: Context) -> None:
    """Poll until cancelled; an error is logged (with its traceback) and the polling goes on."""
    ticks = 0
    while True:
        try:
            await asyncio.sleep(POLL_INTERVAL)
            ticks += 1
            for rec in list(ctx.records.containers.values()):
                if rec["state"] in exits.LIVE:
                    await exits.refresh(ctx, rec)
                    if ticks % MONITOR_CHECK_TICKS == 0 and rec["state"] in exits.LIVE \
                            and not exits.conmon_alive(rec):
                        exits.note_monitor_gone(rec)
            for rec in list(ctx.records.sandboxes.values()):
                infra.check(ctx, rec)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("exit_watcher_error", error=str(e))
