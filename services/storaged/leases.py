"""Leases on unpacked layers, kept on disk: a storaged restart in the middle of a pull keeps them.

A pull leases the layers it unpacks until imaged lists the image (its top
layer then protects them). Held only in memory, a lease would end with a
storaged restart, and a collection before imaged's record could take the
layers the pull is about to record. The table is written after each change
(atomically; a machine crash ends the pulls too, so it is not synced) and
read at start, where leases that ran out meanwhile are dropped. Ends are
wall-clock times, so that they mean the same to the next process.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import structlog

from shared import atomic, quarantine

log = structlog.get_logger(__name__)


class Leases:
    def __init__(self, path: str) -> None:
        self._path = path
        # {lease: (chain ids, end as a unix time)}
        self._held: dict[str, tuple[frozenset[str], float]] = self._load()
        self._writing = asyncio.Lock()

    def _load(self) -> dict[str, tuple[frozenset[str], float]]:
        try:
            with open(self._path, "rb") as f:
                table: Any = json.loads(f.read())
            held = {str(lease): (frozenset(map(str, entry["chain"])), float(entry["until"]))
                    for lease, entry in table.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            # Torn or garbage: set aside as any damaged record is, and no lease kept. A pull in flight
            # then unpacks again what a collection took.
            quarantine.set_aside(os.path.dirname(self._path), [self._path], kind="layer_leases",
                                 name="leases", error=str(e))
            return {}
        now = time.time()
        return {lease: (chain, until) for lease, (chain, until) in held.items() if until > now}

    def __bool__(self) -> bool:
        return bool(self._held)

    def take(self, lease: str, chain: list[str], seconds: float) -> None:
        held, _ = self._held.get(lease, (frozenset(), 0.0))
        self._held[lease] = (held | frozenset(chain), time.time() + seconds)

    def drop(self, lease: str) -> bool:
        return self._held.pop(lease, None) is not None

    def layers(self) -> set[str]:
        """The chain ids held by leases that have not run out (those that have are dropped)."""
        now = time.time()
        for lease, (_, until) in list(self._held.items()):
            if until <= now:
                log.warning("layer_lease_expired", lease=lease)
                del self._held[lease]
        return {cid for chain, _ in self._held.values() for cid in chain}

    async def save(self) -> None:
        """Write the table as it is when the write begins (later changes write it again)."""
        async with self._writing:
            data = json.dumps({lease: {"chain": sorted(chain), "until": until}
                               for lease, (chain, until) in self._held.items()}, sort_keys=True).encode()
            await asyncio.to_thread(atomic.write_bytes, self._path, data, mode=0o600, durable=False)
