"""ReopenContainerLog: conmon reopens the container's log file after the kubelet rotated it."""

from __future__ import annotations

from typing import Any

from services.runtimed import conmon, exits
from services.runtimed.context import Context
from shared.errors import Internal

# How long conmon may take to create the new log file.
REOPEN_WAIT = 5.0


async def reopen(ctx: Context, container_id: str) -> dict[str, Any]:
    rec = await exits.running(ctx, container_id)
    conmon.reopen_log(rec["bundle"])
    if not await exits.wait_file(rec["log_path"], REOPEN_WAIT):
        raise Internal(f"conmon did not reopen the log of {container_id}")
    return {}
