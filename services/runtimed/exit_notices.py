"""Calls waiting for a container's (or a pod's infra process's) exit file, woken as soon as it is written.

The exit watcher (exit_watcher.py) wakes the waiters of a name when inotify
reports that file written in the exit directory; a waiter then reads the file
itself. Waiters also look again every `recheck` seconds, in case the watch
is not running (inotify unavailable) or an event was lost.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Iterator

# How often a waiter looks at the exit file by itself: while the directory is watched
# this is only a safety net; without the watch it is the only way to see the exit.
RECHECK_WATCHED = 1.0
RECHECK_UNWATCHED = 0.02


class ExitNotices:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        # The exit directory is watched with inotify (exit_watcher.py).
        self.watching = False

    @property
    def recheck(self) -> float:
        return RECHECK_WATCHED if self.watching else RECHECK_UNWATCHED

    @contextmanager
    def expect(self, name: str) -> Iterator[asyncio.Future[None]]:
        """A future done when `name` is written; registered before the caller looks at the file,
        so that a write between the look and the wait is not missed."""
        seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(name, set()).add(seen)
        try:
            yield seen
        finally:
            waiting = self._waiters.get(name)
            if waiting is not None:
                waiting.discard(seen)
                if not waiting:
                    del self._waiters[name]

    async def wait(self, seen: asyncio.Future[None], timeout: float) -> None:
        """Until `seen` is done, or `timeout` (at most `recheck`) has passed."""
        await asyncio.wait({seen}, timeout=max(0.0, min(timeout, self.recheck)))

    def wake(self, name: str) -> None:
        for seen in self._waiters.get(name, ()):
            if not seen.done():
                seen.set_result(None)

    def wake_all(self) -> None:
        """Events were lost: every waiter looks again."""
        for name in list(self._waiters):
            self.wake(name)
