"""runtimed's pods and containers in memory: the records, their names, their locks, their persistence.

A record is a plain dict, saved (store.py) at each change of state. A pod or
container is found by its id or by a unique prefix of it; while it is
reserved or being made it exists but is not visible to status calls.
`on_change` hears every save and every record dropped (state_feed.py).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncContextManager, Awaitable, Callable

from services.runtimed.store import Store
from shared.errors import NotFound
from shared.short_ids import find as _find
from shared.keyed_locks import KeyedLocks

# Visible states and their CRI names; the others (reserved, creating, removing) are not listed.
SANDBOX_STATES = {"ready": "SANDBOX_READY", "notready": "SANDBOX_NOTREADY"}
CONTAINER_STATES = {"created": "CONTAINER_CREATED", "running": "CONTAINER_RUNNING",
                    "exited": "CONTAINER_EXITED"}

SANDBOXES = "sandboxes"
CONTAINERS = "containers"
# Every state a saved record may be in, and the keys every saved record has.
ALL_STATES = {SANDBOXES: ("reserved", "creating", *SANDBOX_STATES, "removing"),
              CONTAINERS: ("reserved", "creating", *CONTAINER_STATES, "removing")}
REQUIRED = {SANDBOXES: ("id", "name", "state", "config"),
            CONTAINERS: ("id", "name", "state", "config", "sandbox_id")}


class Records:
    def __init__(self, state_dir: str) -> None:
        self._directory = os.path.join(state_dir, "records")
        self.sandboxes: dict[str, dict[str, Any]] = {}
        self.containers: dict[str, dict[str, Any]] = {}
        # Name -> id: the names held by reservations and by the pods and containers made from them.
        self.names: dict[str, dict[str, str]] = {SANDBOXES: {}, CONTAINERS: {}}
        self._locks = KeyedLocks()
        self._changed = asyncio.Condition()
        self._store: Store | None = None
        # Called with (kind, record) at each save and once a record is dropped.
        self.on_change: Callable[[str, dict[str, Any]], None] | None = None

    def load(self) -> None:
        """Read every saved record (at start, before anything else touches them); a damaged one is
        moved to quarantine and left out (recovery.py finds what it made)."""
        self._store = Store(self._directory)
        for kind in (SANDBOXES, CONTAINERS):
            for rec in self._store.load_all(kind, REQUIRED[kind], ALL_STATES[kind]):
                self.add(kind, rec)

    def add(self, kind: str, rec: dict[str, Any]) -> None:
        """Hold a record and its name (a loaded or rebuilt one; a name not known is held by none)."""
        self.table(kind)[rec["id"]] = rec
        if rec["name"]:
            self.names[kind][rec["name"]] = rec["id"]

    def table(self, kind: str) -> dict[str, dict[str, Any]]:
        return self.sandboxes if kind == SANDBOXES else self.containers

    # -- locks and changes ------------------------------------------------------

    def lock(self, object_id: str) -> AsyncContextManager[None]:
        """Held while a pod or container changes state: `async with records.lock(id):`."""
        return self._locks.hold(object_id)

    async def notify(self) -> None:
        """Wake whoever waits for a reservation to be finished or released."""
        async with self._changed:
            self._changed.notify_all()

    async def wait_change(self, timeout: float) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    # -- persistence ------------------------------------------------------------

    async def save(self, kind: str, rec: dict[str, Any], *, durable: bool = True) -> None:
        """Write the record (atomically, always). `durable=False` skips the fsyncs: for a state written
        after the step it records, which a machine crash loses along with the step itself (the pod's
        processes and runc's state in /run); what comes before a step must survive, to undo it."""
        assert self._store is not None
        self.touched(kind, rec)
        await self._store.save(kind, rec, durable=durable)

    def touched(self, kind: str, rec: dict[str, Any]) -> None:
        """Tell `on_change` of a change (saves do; a fact kept only in memory, such as a dead infra process, too)."""
        if self.on_change is not None:
            self.on_change(kind, rec)

    async def sync(self, kind: str, object_id: str) -> None:
        """On disk, a record saved with `durable=False`: started beside the step it guards, so that
        its wait overlaps the step's, and awaited before the call answers."""
        assert self._store is not None
        await self._store.sync(kind, object_id)

    async def save_sandbox(self, rec: dict[str, Any], *, durable: bool = True) -> None:
        await self.save(SANDBOXES, rec, durable=durable)

    async def save_container(self, rec: dict[str, Any], *, durable: bool = True) -> None:
        await self.save(CONTAINERS, rec, durable=durable)

    async def back_to_reserved(self, kind: str, rec: dict[str, Any]) -> None:
        """A creation was undone: the name stays held, and whoever waits for it may retry."""
        rec["state"] = "reserved"
        await self.save(kind, rec)
        await self.notify()

    async def forget(self, kind: str, rec: dict[str, Any]) -> None:
        """Drop a sandbox's or container's record and its name."""
        assert self._store is not None
        await self._store.delete(kind, rec["id"])
        self.table(kind).pop(rec["id"], None)
        names = self.names[kind]
        if names.get(rec["name"]) == rec["id"]:
            del names[rec["name"]]
        self.touched(kind, rec)

    async def release(self, kind: str, record_id: str, undo: Callable[[dict[str, Any]], Awaitable[Any]]) -> None:
        """Undo a reservation whose creation failed (`undo`, then the record and its name go);
        a finished pod or container is left alone."""
        rec = self.table(kind).get(record_id)
        if rec is None:
            return
        async with self.lock(record_id):
            if rec["state"] in ("reserved", "creating"):
                await undo(rec)
                await self.forget(kind, rec)
        await self.notify()

    # -- lookups ----------------------------------------------------------------

    def sandbox(self, sandbox_id: str, *, visible: bool = False) -> dict[str, Any]:
        rec = _find(self.sandboxes, sandbox_id)
        if rec is None or (visible and rec["state"] not in SANDBOX_STATES):
            raise NotFound(f"pod sandbox {sandbox_id} not found")
        return rec

    def container(self, container_id: str, *, visible: bool = False) -> dict[str, Any]:
        rec = _find(self.containers, container_id)
        if rec is None or (visible and rec["state"] not in CONTAINER_STATES):
            raise NotFound(f"container {container_id} not found")
        return rec

    def known_sandbox(self, sandbox_id: str) -> dict[str, Any] | None:
        """The pod with this id or unique id prefix, in any state; None when there is none."""
        return _find(self.sandboxes, sandbox_id)

    def known_container(self, container_id: str) -> dict[str, Any] | None:
        """The container with this id or unique id prefix, in any state; None when there is none."""
        return _find(self.containers, container_id)

    def containers_of(self, sandbox_id: str) -> list[dict[str, Any]]:
        return [c for c in self.containers.values() if c["sandbox_id"] == sandbox_id]
