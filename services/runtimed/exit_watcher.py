"""The task that notices exits nobody asked about: containers' exit files and pods' infra processes.

conmon writes `<exit dir>/<id>` when a container (or a pod's infra process)
ends; inotify tells us the name at once (as CRI-O watches its exits
directory), and the record is marked exited and the event published. A slow
safety poll still looks at every live container and pod: for an exit whose
event was lost, and for monitors (conmon) that died without writing one.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from services.runtimed import exits, infra
from services.runtimed.context import Context
from shared.inotify import DirectoryWatch

log = structlog.get_logger(__name__)

# Seconds between two looks at every live container and pod (and at their monitors).
SAFETY_POLL = 2.0
# The same, when the exit directory cannot be watched: then polling is all there is.
POLL_WITHOUT_WATCH = 0.25
# Without the watch, monitors are looked for every few polls, as they die rarely.
MONITOR_CHECK_POLLS = 8

_SWEEP = ""  # in the queue: look at everything (the kernel dropped events)


async def watch(ctx: Context) -> None:
    """Watch and poll until cancelled; an error is logged (with its traceback) and the watch goes on."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    notices = ctx.exit_notices

    def written(names: list[str]) -> None:
        for name in names:
            notices.wake(name)
            queue.put_nowait(name)

    def lost() -> None:
        log.warning("exit_watch_overflow")
        notices.wake_all()
        queue.put_nowait(_SWEEP)

    directory = DirectoryWatch(ctx.exit_dir, written, lost)
    try:
        directory.start(asyncio.get_running_loop())
        notices.watching = True
        interval = SAFETY_POLL
    except OSError as e:
        log.warning("exit_dir_not_watched", directory=ctx.exit_dir, error=str(e))
        interval = POLL_WITHOUT_WATCH
    polls = 0
    next_poll = time.monotonic() + interval
    try:
        while True:
            try:
                name = await asyncio.wait_for(queue.get(), max(0.0, next_poll - time.monotonic()))
            except TimeoutError:
                name = None
            try:
                if name is None or name == _SWEEP:
                    if name is None:
                        polls += 1
                        next_poll = time.monotonic() + interval
                    await _sweep(ctx, check_monitors=notices.watching or polls % MONITOR_CHECK_POLLS == 0)
                else:
                    await _written(ctx, name)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("exit_watcher_error", error=str(e))
    finally:
        notices.watching = False
        directory.close()


async def _written(ctx: Context, name: str) -> None:
    """An exit file was written: of a container, or of a pod's infra process (named by the pod's id)."""
    rec = ctx.records.containers.get(name)
    if rec is not None and rec["state"] in exits.LIVE:
        await exits.refresh(ctx, rec)
    sandbox = ctx.records.sandboxes.get(name)
    if sandbox is not None:
        infra.check(ctx, sandbox)


async def _sweep(ctx: Context, *, check_monitors: bool) -> None:
    for rec in list(ctx.records.containers.values()):
        if rec["state"] in exits.LIVE:
            await exits.refresh(ctx, rec)
            if check_monitors and rec["state"] in exits.LIVE and not exits.conmon_alive(rec):
                exits.note_monitor_gone(rec)
    for rec in list(ctx.records.sandboxes.values()):
        infra.check(ctx, rec)
