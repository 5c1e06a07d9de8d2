"""A daemon's state feed: every change of what the frontend reads from it, numbered, on its event socket.

The frontend answers List* and *Status calls from memory (its read model,
services/frontend/read_model.py). What it keeps there is fed from here: the
daemon puts the current view of an object (a pod's status, an image's record,
None once the object is gone or hidden) under a key each time the object
changes, and the feed publishes the change on the topic "state" when the view
is new:

    {"epoch": str, "seq": int, "key": "container/<id>", "view": {...} | None}

`seq` counts the changes of this process (1, 2, 3...); `epoch` names the
process (it changes when the daemon restarts, and the counter starts again).
Every bus reply of the daemon carries the position (epoch, seq) it had when
the reply was sent (shared/bus/server.py), so the frontend knows how far its
copy must have got before it answers a read that follows a write.

Besides changes the feed says where it is, without a key:
- a heartbeat every HEARTBEAT seconds, so that a change lost at the end of a
  burst is noticed (the heartbeat's seq is beyond what the copy holds);
- a marker right after each snapshot, carrying the snapshot's caller's token:
  once the caller sees it, its subscription is known to be live, and every
  change after the snapshot reaches it.

The feed keeps the last view of every key: that is the snapshot.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable

import structlog

log = structlog.get_logger(__name__)

TOPIC = "state"
HEARTBEAT = 1.0

Publish = Callable[[str, dict[str, Any]], None]


class StateFeed:
    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        # Unique per process: 8 random bytes, so a restarted daemon is never taken for the old one.
        self.epoch = os.urandom(8).hex()
        self.seq = 0
        self._views: dict[str, dict[str, Any]] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    def position(self) -> tuple[str, int]:
        """(epoch, seq): how far the feed has got; every change before is published."""
        return self.epoch, self.seq

    def put(self, key: str, view: dict[str, Any] | None) -> None:
        """The view of `key` now (None: gone); published as the next change when it differs from the last."""
        if view is None:
            if self._views.pop(key, None) is None:
                return
        else:
            if self._views.get(key) == view:
                return
            self._views[key] = view
        self.seq += 1
        self._publish(TOPIC, {"epoch": self.epoch, "seq": self.seq, "key": key, "view": view})

    def keys(self) -> set[str]:
        """The keys that have a view."""
        return set(self._views)

    def snapshot(self, marker: str) -> dict[str, Any]:
        """Every key's view and the position they reflect; then the marker, so its caller knows it listens."""
        taken = {"epoch": self.epoch, "seq": self.seq, "views": dict(self._views)}
        self._publish(TOPIC, {"epoch": self.epoch, "seq": self.seq, "marker": marker})
        return taken

    # -- heartbeats ---------------------------------------------------------------

    def start(self) -> None:
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="state-feed-heartbeat")

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            self._publish(TOPIC, {"epoch": self.epoch, "seq": self.seq})
