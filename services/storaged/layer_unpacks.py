"""The layers storaged holds, as `unpack` calls make them and garbage collection removes them.

Concurrent calls that want the same layer share one unpack. A layer made for
calls that all failed is removed again, so a failed unpack leaves the store
as it found it. Garbage collection spares every layer a call or a root file
system creation is working on (`pinned`), every layer a caller holds a lease
on (a pull, until imaged lists the image), and every layer a mounted root
file system uses, with the layers below them. A layer being deleted is
unpacked again only once its directory is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import structlog

from services.storaged.digests import chain_ids, check_digest
from services.storaged.layer_store import LayerRecord, LayerStore
from services.storaged.leases import Leases
from shared import tracing
from shared.config import Config
from shared.errors import CriopyError, InvalidArgument

log = structlog.get_logger(__name__)

# Layers extracted at once: decompression, hashing and file writes release
# the GIL, so threads overlap well; more would only compete for the disk.
_PARALLEL_UNPACKS = max(1, min(4, os.cpu_count() or 1))
# A lease on unpacked layers lasts at most this long, whatever its holder asked:
# a holder that died (a frontend restarted mid-pull) cannot keep layers forever.
MAX_LEASE_SECONDS = 3600.0
DEFAULT_LEASE_SECONDS = 600.0
LEASES_FILE = "leases.json"


@dataclass
class _Made:
    """A layer unpack started by an `unpack` call, while calls that want the layer run."""

    task: asyncio.Task[None]
    askers: set[int] = field(default_factory=set)
    # A call that wanted the layer succeeded: it is in use, whatever the others do.
    kept: bool = False


class LayerUnpacks:
    def __init__(self, store: LayerStore, config: Config, in_use: Callable[[], list[str]],
                 mounted: Callable[[], set[str]]) -> None:
        """`in_use`: the top layers of the root file systems; `mounted` (blocking): the chain ids
        mounted overlays use, also when a damaged record broke their chain. Collection spares both."""
        self._store = store
        self._config = config
        self._in_use = in_use
        self._mounted = mounted
        self._blob_root = str(config.state_dir("imaged"))
        # The layers in the store, by chain id (loaded at start).
        self.records: dict[str, LayerRecord] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # Chain ids a call or a creation is working on: garbage collection spares them.
        self._pins: dict[str, int] = {}
        self._slots = asyncio.Semaphore(_PARALLEL_UNPACKS)
        # Layers made for unpack calls still running: when every call that wanted one
        # failed, it is removed again.
        self._made: dict[str, _Made] = {}
        self._calls = itertools.count(1)
        # Chain ids a caller keeps past its unpack call, until it releases them or the lease
        # runs out (PullImage: until imaged lists the image).
        self._leases = Leases(os.path.join(store.root, LEASES_FILE))
        # Layers being deleted, by chain id: unpacking one again waits until its directory is gone.
        self._removing: dict[str, asyncio.Future[Any]] = {}
        # One garbage collection at a time.
        self._collecting = asyncio.Lock()

    def cancel(self) -> None:
        """Stop the unpacks in flight (storaged is stopping)."""
        for task in list(self._inflight.values()):
            task.cancel()

    @contextmanager
    def pinned(self, chain: list[str]) -> Iterator[None]:
        """Spare these layers (and those below them) from garbage collection while the block runs."""
        for cid in chain:
            self._pins[cid] = self._pins.get(cid, 0) + 1
        try:
            yield
        finally:
            for cid in chain:
                self._pins[cid] -= 1
                if not self._pins[cid]:
                    del self._pins[cid]

    # -- unpacking ------------------------------------------------------------------

    async def unpack(self, layers: list[dict], lease: str | None = None,
                     lease_seconds: float | None = None) -> dict[str, Any]:
        """Unpack layer blobs (bottom first) into the store; their chain ids and uncompressed sizes.
        With `lease`, the stack's layers stay out of garbage collection after the call too."""
        specs = [_layer_spec(i, layer) for i, layer in enumerate(layers)]
        chain = chain_ids([s["diff_id"] for s in specs])
        if lease is not None:
            self._lease(lease, chain, lease_seconds)
            await self._leases.save()
        call = next(self._calls)
        finished = False
        try:
            with self.pinned(chain):
                try:
                    async with asyncio.TaskGroup() as group:
                        for i, spec in enumerate(specs):
                            parent = chain[i - 1] if i else None
                            group.create_task(self._ensure_layer(chain[i], parent, spec, call))
                except BaseExceptionGroup as group_error:
                    raise _first_error(group_error) from None
            finished = True
        finally:
            if finished:
                self._release(call, succeeded=True)
            else:
                if lease is not None and self._leases.drop(lease):  # a failed unpack keeps nothing
                    await asyncio.shield(asyncio.ensure_future(self._leases.save()))
                # Also when the caller gave up: the undo runs to its end, and the
                # error is answered only once the store is back as it was.
                await asyncio.shield(asyncio.ensure_future(self._undo_unpack(call)))
        sizes = [self.records[cid].tar_size for cid in chain]
        return {"chain_ids": chain, "top_layer": chain[-1] if chain else None,
                "layer_sizes": sizes, "unpacked_size": sum(sizes)}

    def _lease(self, lease: str, chain: list[str], seconds: float | None) -> None:
        if not isinstance(lease, str) or not lease or len(lease) > 256:
            raise InvalidArgument("lease must be a non-empty string of at most 256 characters")
        if seconds is None:
            seconds = DEFAULT_LEASE_SECONDS
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0:
            raise InvalidArgument(f"lease_seconds must be a positive number, not {seconds!r:.50}")
        self._leases.take(lease, chain, min(seconds, MAX_LEASE_SECONDS))

    async def release(self, lease: str) -> bool:
        """End a lease: its layers are collectable again. False when there was none."""
        if not self._leases.drop(lease):
            return False
        await self._leases.save()
        return True

    def _leased(self) -> set[str]:
        return self._leases.layers()

    async def _ensure_layer(self, chain_id: str, parent: str | None, spec: dict, call: int) -> None:
        """Unpack one layer unless it is there; concurrent requests share the work."""
        if chain_id in self._made:
            self._made[chain_id].askers.add(call)
        while chain_id not in self.records:
            removing = self._removing.get(chain_id)
            if removing is not None:
                # Collected meanwhile: its directory must be gone before it is unpacked again.
                await asyncio.wait({removing})
                continue
            task = self._inflight.get(chain_id)
            mine = task is None
            if task is None:
                task = asyncio.create_task(self._unpack_one(chain_id, parent, spec))
                self._inflight[chain_id] = task
                task.add_done_callback(lambda t: self._forget_inflight(chain_id, t))
            made = self._made.get(chain_id)
            if made is None or made.task is not task:
                made = self._made[chain_id] = _Made(task)
            made.askers.add(call)
            try:
                await asyncio.shield(task)
            except CriopyError:
                if mine:
                    raise
                # Another request's blob failed; try with this request's own blob.

    def _forget_inflight(self, chain_id: str, task: asyncio.Task[None]) -> None:
        if self._inflight.get(chain_id) is task:
            del self._inflight[chain_id]

    async def _undo_unpack(self, call: int) -> None:
        """After a failed unpack call: remove the layers made for it that no call wanting them got."""
        # Unpacks still running finish first (a thread cannot be stopped); those that
        # have not started yet see that nobody wants them any more and do not start.
        running = [m.task for m in self._made.values() if call in m.askers and not m.task.done()]
        if running:
            await asyncio.wait(running)
        unwanted = self._release(call, succeeded=False)
        removed = await self.collect([], only=unwanted) if unwanted else []
        if removed:
            log.info("unpack_undone", removed=[r.chain_id for r in removed])

    def _release(self, call: int, *, succeeded: bool) -> set[str]:
        """End `call`'s interest in the layers made for it; returns those every asker failed."""
        unwanted = set()
        for cid, made in list(self._made.items()):
            if call not in made.askers:
                continue
            made.askers.discard(call)
            made.kept = made.kept or succeeded
            if not made.askers:
                del self._made[cid]
                if not made.kept:
                    unwanted.add(cid)
        return unwanted

    async def _unpack_one(self, chain_id: str, parent: str | None, spec: dict) -> None:
        attributes = {"layer.chain_id": chain_id, "layer.diff_id": spec["diff_id"],
                      "layer.media_type": spec["media_type"]}
        async with self._slots:
            if not self._pins.get(chain_id):
                return  # every call that wanted the layer failed while this one waited for a slot
            with tracing.tracer(__name__).start_as_current_span("unpack layer", attributes=attributes):
                record = await asyncio.to_thread(
                    self._store.unpack, chain_id=chain_id, parent=parent, diff_id=spec["diff_id"],
                    blob_path=spec["path"], media_type=spec["media_type"], blob_root=self._blob_root,
                    allow_device_nodes=self._config.crio.image.allow_device_nodes)
        self.records[chain_id] = record

    # -- garbage collection -------------------------------------------------------------

    async def collect(self, tops: list[str], *, only: set[str] | None) -> list[LayerRecord]:
        """Remove every layer (of `only`, when given) in no stack of `tops`, of a root file system,
        pinned, leased or mounted."""
        async with self._collecting:
            mounted = await asyncio.to_thread(self._mounted)
            # From here to the records' removal nothing awaits: a creation that has not
            # pinned its layers yet finds them gone, one that has finds them kept.
            kept = [*tops, *self._in_use(), *self._pins, *self._leased()]
            victims = [r for r in LayerStore.unreachable(self.records, kept, set(self._inflight) | mounted)
                       if only is None or r.chain_id in only]
            if not victims:
                return []
            removal = asyncio.ensure_future(asyncio.to_thread(self._remove_layers, victims))
            for record in victims:
                del self.records[record.chain_id]
                self._removing[record.chain_id] = removal
            removal.add_done_callback(lambda _: self._forget_removal(victims, removal))
            # The deletion runs to its end even if this call is given up.
            await asyncio.shield(removal)
        return victims

    def _remove_layers(self, victims: list[LayerRecord]) -> None:
        for record in victims:
            self._store.remove(record)
            log.info("layer_removed", chain_id=record.chain_id)

    def _forget_removal(self, victims: list[LayerRecord], removal: asyncio.Future[Any]) -> None:
        for record in victims:
            if self._removing.get(record.chain_id) is removal:
                del self._removing[record.chain_id]


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report for a failed group of layer unpacks: a typed one if any."""
    leaves: list[BaseException] = []

    def flatten(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                flatten(e)
            else:
                leaves.append(e)

    flatten(group)
    return next((e for e in leaves if isinstance(e, CriopyError)), leaves[0])


def _layer_spec(index: int, layer: Any) -> dict[str, str]:
    """Check one entry of `unpack`'s layers (as imaged's pull returns them)."""
    if not isinstance(layer, dict):
        raise InvalidArgument(f"layers[{index}] must be a map")
    diff_id = check_digest(layer.get("diff_id"), f"layers[{index}].diff_id")
    path = layer.get("path")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise InvalidArgument(f"layers[{index}].path must be an absolute path, not {path!r:.200}")
    media_type = layer.get("media_type") or ""
    if not isinstance(media_type, str):
        raise InvalidArgument(f"layers[{index}].media_type must be a string")
    return {"diff_id": diff_id, "path": path, "media_type": media_type}
