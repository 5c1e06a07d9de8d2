"""runtimed's records on disk: one JSON file per pod sandbox and per container, written atomically.

A record is written to a temporary file, flushed to disk and renamed over the
old one, and the rename itself is flushed (shared/atomic.py), so a SIGKILL or
a power loss at any moment leaves either the old or the new record. A record
found torn or garbage at start all the same (a disk that lied about its
flushes) is moved to runtimed's quarantine/ and left out; recovery.py rebuilds
what it can of it from the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import structlog

from shared import atomic, quarantine
from shared.keyed_locks import KeyedLocks

log = structlog.get_logger(__name__)

# A directory of records, and the kind its damaged records are quarantined and counted as.
KINDS = {"sandboxes": "sandbox", "containers": "container"}


class Store:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._locks = KeyedLocks()
        for kind in KINDS:
            os.makedirs(os.path.join(directory, kind), exist_ok=True)

    def _path(self, kind: str, object_id: str) -> str:
        return os.path.join(self.directory, kind, object_id + ".json")

    async def save(self, kind: str, record: dict[str, Any], *, durable: bool = True) -> None:
        """Replace the record's file; `durable`: on disk when this returns (see Records.save)."""
        data = json.dumps(record, sort_keys=True).encode()
        # Saves of one record land in the order they were asked for.
        async with self._locks.hold(f"{kind}/{record['id']}"):
            await asyncio.to_thread(atomic.write_bytes, self._path(kind, record["id"]), data, durable=durable)

    async def sync(self, kind: str, object_id: str) -> None:
        """Put on disk a record saved without `durable`, and its latest save if another followed."""
        async with self._locks.hold(f"{kind}/{object_id}"):
            await asyncio.to_thread(atomic.sync, self._path(kind, object_id))

    async def delete(self, kind: str, object_id: str) -> None:
        def remove() -> None:
            try:
                os.unlink(self._path(kind, object_id))
            except FileNotFoundError:
                pass
        await asyncio.to_thread(remove)

    def load_all(self, kind: str, required: tuple[str, ...], states: tuple[str, ...]) -> list[dict[str, Any]]:
        """Every readable record of `kind`, with the `required` keys and one of the `states`;
        the others go to quarantine."""
        records = []
        directory = os.path.join(self.directory, kind)
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if name.endswith(".tmp"):  # a write cut off by a crash
                os.unlink(path)
                continue
            if not name.endswith(".json"):
                continue
            object_id = name[:-len(".json")]
            try:
                with open(path, "rb") as f:
                    rec = json.loads(f.read())
                if not isinstance(rec, dict) or rec.get("id") != object_id:
                    raise ValueError("not the record its file name says")
                missing = [key for key in required if key not in rec]
                if missing:
                    raise ValueError(f"no {', '.join(missing)}")
                if rec["state"] not in states:
                    raise ValueError(f"unknown state {rec['state']!r}")
            except (OSError, ValueError) as e:
                quarantine.set_aside(os.path.dirname(self.directory), [path], kind=KINDS[kind],
                                     name=object_id, error=str(e) or type(e).__name__)
                continue
            records.append(rec)
        return records
