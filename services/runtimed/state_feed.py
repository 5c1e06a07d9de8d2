"""runtimed's pods and containers as the frontend's read model keeps them, on the state feed (shared/bus/feed.py).

Each save of a record, and each record dropped, puts its view on the feed: a
visible pod's PodSandboxStatus, a visible container's ContainerStatus and its
pod's id, built by status.py as the status calls build them; None for a
record that is gone or not visible (reserved, being made, being removed). So
exits and OOM kills, which runtimed's exit watcher records, reach the model
with their full status and their number, like any change a CRI call makes.
"""

from __future__ import annotations

from typing import Any

from services.runtimed import status
from services.runtimed.context import Context
from services.runtimed.records import CONTAINER_STATES, CONTAINERS, SANDBOX_STATES, SANDBOXES
from shared.bus.feed import StateFeed


def key(kind: str, object_id: str) -> str:
    return f"{'sandbox' if kind == SANDBOXES else 'container'}/{object_id}"


def view(ctx: Context, kind: str, rec: dict[str, Any]) -> dict[str, Any] | None:
    """What the read model keeps of a record; None when status calls would not find it."""
    if ctx.records.table(kind).get(rec["id"]) is not rec:
        return None
    if kind == SANDBOXES:
        return {"status": status.sandbox_status(rec)} if rec["state"] in SANDBOX_STATES else None
    if rec["state"] not in CONTAINER_STATES:
        return None
    return {"sandbox_id": rec["sandbox_id"], "status": status.container_status(rec)}


def attach(ctx: Context, feed: StateFeed) -> None:
    """Put every change of a record on the feed from now on."""
    ctx.records.on_change = lambda kind, rec: feed.put(key(kind, rec["id"]), view(ctx, kind, rec))


def put_all(ctx: Context, feed: StateFeed) -> None:
    """Put every record's view (at start, once the records are reconciled): the feed's first snapshot."""
    for kind in (SANDBOXES, CONTAINERS):
        for rec in list(ctx.records.table(kind).values()):
            feed.put(key(kind, rec["id"]), view(ctx, kind, rec))
