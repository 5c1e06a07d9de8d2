"""imaged's ready images as the frontend's read model keeps them, on the state feed (shared/bus/feed.py).

After every write to the image records the feed is brought level with the
database: each ready image's record as ListImages gives it (with the time it
was pulled, their order), and None for an image that is gone or not ready.
All of them, not only the image written: a pull that becomes ready takes its
tags from the image that had them. Refreshes run one at a time and read the
database afresh, so a later one never publishes an older state.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from services.imaged.records import ImageRecords
from shared.bus.feed import StateFeed

View = Callable[[dict[str, Any]], dict[str, Any]]


def key(image_id: str) -> str:
    return f"image/{image_id}"


class ImageFeed:
    def __init__(self, feed: StateFeed, view: View) -> None:
        self.feed = feed
        self._view = view
        self._lock = asyncio.Lock()

    async def refresh(self, records: ImageRecords | None) -> None:
        """Publish what changed in the ready images since the last refresh."""
        if records is None:  # stopping
            return
        async with self._lock:
            ready = await asyncio.to_thread(records.all)
            self.put_all(ready)

    def put_all(self, ready: list[dict[str, Any]]) -> None:
        keys = set()
        for record in ready:
            keys.add(key(record["id"]))
            self.feed.put(key(record["id"]), self._view(record))
        for gone in self.feed.keys() - keys:
            self.feed.put(gone, None)
