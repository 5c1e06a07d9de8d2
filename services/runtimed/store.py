"""runtimed's records on disk: one JSON file per pod sandbox and per container, written atomically.

A record is written to a temporary file, flushed to disk and renamed over the
old one, and the rename itself is flushed (shared/atomic.py), so a SIGKILL or
a power loss at any moment leaves either the old or the new record.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import structlog

from shared import atomic
from shared.keyed_locks import KeyedLocks

log = structlog.get_logger(__name__)


class Store:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._locks = KeyedLocks()
        for kind in ("sandboxes", "containers"):
            os.makedirs(os.path.join(directory, kind), exist_ok=True)

    def _path(self, kind: str, object_id: str) -> str:
        return os.path.join(self.directory, kind, object_id + ".json")

    async def save(self, kind: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, sort_keys=True).encode()
        # Saves of one record land in the order they were asked for.
        async with self._locks.hold(f"{kind}/{record['id']}"):
            await asyncio.to_thread(atomic.write_bytes, self._path(kind, record["id"]), data)

    async def delete(self, kind: str, object_id: str) -> None:
        def remove() -> None:
            try:
                os.unlink(self._path(kind, object_id))
            except FileNotFoundError:
                pass
        await asyncio.to_thread(remove)

    def load_all(self, kind: str) -> list[dict[str, Any]]:
        records = []
        directory = os.path.join(self.directory, kind)
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if name.endswith(".tmp"):  # a write cut off by a crash
                os.unlink(path)
                continue
            if not name.endswith(".json"):
                continue
            try:
                with open(path, "rb") as f:
                    records.append(json.loads(f.read()))
            except (OSError, ValueError) as e:
                log.error("record_unreadable", path=path, error=str(e))
        return records
