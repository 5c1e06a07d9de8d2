"""ImageFsInfo and stats answers, reused for a short while when nothing changed.

These calls measure disks and cgroups in several daemons; the kubelet asks
them again and again. An answer is reused for `ttl` seconds, for the same
request, as long as the read model's version (every change of a pod,
container or image, on a feed or in a reply) is the one it was computed
under: so a call that follows a write is computed afresh, and usage that
changes by itself (CPU time, bytes written) is at most `ttl` old.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable

# Distinct requests remembered (the kubelet's filters are few); the oldest is forgotten first.
MAX_ENTRIES = 64


class AnswerCache:
    def __init__(self, ttl: float, version: Callable[[], Any]) -> None:
        self.ttl = ttl
        self._version = version
        self._entries: OrderedDict[Any, tuple[Any, Any, float]] = OrderedDict()

    async def get(self, key: Any, compute: Callable[[], Awaitable[Any]]) -> Any:
        """The answer remembered for `key` if still good, else `compute()`'s (remembered)."""
        if self.ttl <= 0:
            return await compute()
        version = self._version()
        now = time.monotonic()
        found = self._entries.get(key)
        if found is not None and found[1] == version and found[2] > now:
            return found[0]
        # The version from before computing: a change meanwhile makes the answer stale at once.
        answer = await compute()
        self._entries[key] = (answer, version, now + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)
        return answer
