"""storaged: unpacked layers, container root filesystems on overlayfs, disk usage."""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import structlog

from services.storaged import overlay
from services.storaged.digests import chain_ids, check_digest
from services.storaged.layer_store import LayerRecord, LayerStore
from services.storaged.rootfs_store import CREATED, RootfsRecord, RootfsStore, check_container_id
from services.storaged.usage import measure, measure_all
from shared import mountinfo, tracing
from shared.bus.api import STORAGED
from shared.bus.service import Service, method
from shared.config import Config
from shared.errors import AlreadyExists, CriopyError, InvalidArgument, NotFound
from shared.keyed_locks import KeyedLocks

log = structlog.get_logger(__name__)

# Layers extracted at once: decompression, hashing and file writes release
# the GIL, so threads overlap well; more would only compete for the disk.
_PARALLEL_UNPACKS = max(1, min(4, os.cpu_count() or 1))


class Storaged(Service):
    api = STORAGED
    # Mounting overlays and recreating the files of layers with their owners,
    # modes, setuid bits, file capabilities and (when allowed) device nodes.
    capabilities = frozenset({
        "CAP_SYS_ADMIN", "CAP_CHOWN", "CAP_FOWNER", "CAP_FSETID",
        "CAP_DAC_OVERRIDE", "CAP_MKNOD", "CAP_SETFCAP",
    })

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        # Mount points in /proc/self/mountinfo are real paths.
        self._root = os.path.realpath(config.state_dir("storaged"))
        self._layers = LayerStore(self._root)
        self._rootfs = RootfsStore(self._root, self._layers.tmp_dir, self._layers.trash_dir)
        self._blob_root = str(config.state_dir("imaged"))
        self._records: dict[str, LayerRecord] = {}
        self._containers: dict[str, RootfsRecord] = {}
        # One container's root file system changes at a time; different containers' in parallel,
        # so that a big removal (an rmtree of its writable layer) holds up no other creation.
        self._rootfs_locks = KeyedLocks()
        # One garbage collection at a time.
        self._gc_lock = asyncio.Lock()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # Chain ids an unpack or a root file system creation is working on, with their
        # parents: garbage collection spares them.
        self._pins: dict[str, int] = {}
        self._slots = asyncio.Semaphore(_PARALLEL_UNPACKS)

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(os.makedirs, self._root, mode=0o711, exist_ok=True)
        containers, broken = await asyncio.to_thread(self._rootfs.load)
        self._containers = containers
        # Stray mounts go first: deleting leftovers must never reach into a mount.
        await self._unmount_strays()
        self._records = await asyncio.to_thread(self._layers.load)
        for container_id in broken:
            await asyncio.to_thread(self._rootfs.delete, container_id)
        for record in list(self._containers.values()):
            if record.state != CREATED:
                await self._remove(record)
        await self._remount_missing()
        self.ready = True
        log.info("storaged_started", layers=len(self._records), rootfs=len(self._containers),
                 root=self._root)

    async def stop(self) -> None:
        # Mounts stay: containers keep running while storaged restarts.
        for task in list(self._inflight.values()):
            task.cancel()

    async def _unmount_strays(self) -> None:
        """Unmount whatever is mounted in the store but is no container's root file system."""
        wanted = {self._rootfs.merged(cid) for cid, r in self._containers.items() if r.state == CREATED}
        for point in await asyncio.to_thread(mountinfo.mount_points_under, self._root):
            if point in wanted or any(point.startswith(w + "/") for w in wanted):
                continue
            log.warning("stray_mount_removed", mount_point=point)
            while await overlay.unmount(point):
                pass  # mounts stacked on one point

    async def _remount_missing(self) -> None:
        mounted = set(await asyncio.to_thread(mountinfo.mount_points_under, self._root))
        for record in list(self._containers.values()):
            if self._rootfs.merged(record.container_id) in mounted:
                continue
            try:
                await self._mount(record)
                log.info("rootfs_remounted", container_id=record.container_id)
            except CriopyError as e:
                # Left unmounted: create_rootfs mounts it again, remove_rootfs cleans up.
                log.error("rootfs_remount_failed", container_id=record.container_id, error=e.message)

    # -- layers -------------------------------------------------------------

    @method
    async def unpack(self, layers: list[dict]) -> dict[str, Any]:
        """Unpack layer blobs (bottom first) into the store; returns their chain ids and uncompressed sizes."""
        if not isinstance(layers, list):
            raise InvalidArgument("layers must be a list")
        specs = [_layer_spec(i, layer) for i, layer in enumerate(layers)]
        chain = chain_ids([s["diff_id"] for s in specs])
        try:
            with self._pinned(chain):
                async with asyncio.TaskGroup() as group:
                    for i, spec in enumerate(specs):
                        parent = chain[i - 1] if i else None
                        group.create_task(self._ensure_layer(chain[i], parent, spec))
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None
        sizes = [self._records[cid].tar_size for cid in chain]
        return {"chain_ids": chain, "top_layer": chain[-1] if chain else None,
                "layer_sizes": sizes, "unpacked_size": sum(sizes)}

    async def _ensure_layer(self, chain_id: str, parent: str | None, spec: dict) -> None:
        """Unpack one layer unless it is there; concurrent requests share the work."""
        while chain_id not in self._records:
            task = self._inflight.get(chain_id)
            mine = task is None
            if task is None:
                task = asyncio.create_task(self._unpack_one(chain_id, parent, spec))
                self._inflight[chain_id] = task
                task.add_done_callback(lambda t: self._forget_inflight(chain_id, t))
            try:
                await asyncio.shield(task)
            except CriopyError:
                if mine:
                    raise
                # Another request's blob failed; try with this request's own blob.

    @contextmanager
    def _pinned(self, chain_ids: list[str]) -> Iterator[None]:
        """Spare these layers (and their parents) from garbage collection while the block runs."""
        for cid in chain_ids:
            self._pins[cid] = self._pins.get(cid, 0) + 1
        try:
            yield
        finally:
            for cid in chain_ids:
                self._pins[cid] -= 1
                if not self._pins[cid]:
                    del self._pins[cid]

    def _forget_inflight(self, chain_id: str, task: asyncio.Task[None]) -> None:
        if self._inflight.get(chain_id) is task:
            del self._inflight[chain_id]

    async def _unpack_one(self, chain_id: str, parent: str | None, spec: dict) -> None:
        attributes = {"layer.chain_id": chain_id, "layer.diff_id": spec["diff_id"],
                      "layer.media_type": spec["media_type"]}
        async with self._slots:
            with tracing.tracer(__name__).start_as_current_span("unpack layer", attributes=attributes):
                record = await asyncio.to_thread(
                    self._layers.unpack, chain_id=chain_id, parent=parent, diff_id=spec["diff_id"],
                    blob_path=spec["path"], media_type=spec["media_type"], blob_root=self._blob_root,
                    allow_device_nodes=self.config.crio.image.allow_device_nodes)
        self._records[chain_id] = record

    @method
    async def layer_status(self, chain_id: str) -> dict[str, Any] | None:
        """A layer's record, or None when it is not in the store."""
        record = self._records.get(check_digest(chain_id, "chain_id"))
        return record.to_wire() if record else None

    @method
    async def unpacked_sizes(self, top_layers: list[str]) -> dict[str, int]:
        """{top layer: bytes of its stack's uncompressed layers} for the stacks that are all in the store.

        A layer's size is that of its uncompressed tar, as containers/storage
        counts a layer's UncompressedSize, which CRI-O adds up for an image's size.
        """
        if not isinstance(top_layers, list):
            raise InvalidArgument("top_layers must be a list")
        sizes = {}
        for top in top_layers:
            try:
                sizes[top] = sum(r.tar_size for r in LayerStore.chain(self._records, check_digest(top, "top layer")))
            except NotFound:
                continue
        return sizes

    @method
    async def list_layers(self) -> list[dict[str, Any]]:
        return [r.to_wire() for r in self._records.values()]

    @method
    async def gc_layers(self, keep_top_layers: list[str]) -> dict[str, Any]:
        """Remove every layer that is neither in a kept stack nor under a root file system."""
        if not isinstance(keep_top_layers, list):
            raise InvalidArgument("keep_top_layers must be a list")
        tops = [check_digest(t, "keep_top_layers entry") for t in keep_top_layers]
        async with self._gc_lock:
            # From here to the records' removal nothing awaits: a creation that has not
            # pinned its layers yet finds them gone, one that has finds them kept.
            tops += [r.top_layer for r in self._containers.values() if r.top_layer]
            victims = LayerStore.unreachable(self._records, tops + list(self._pins), set(self._inflight))
            for record in victims:
                del self._records[record.chain_id]
            for record in victims:
                await asyncio.to_thread(self._layers.remove, record)
                log.info("layer_removed", chain_id=record.chain_id)
        return {"removed": [r.chain_id for r in victims],
                "freed_bytes": sum(r.used_bytes for r in victims)}

    # -- root file systems ----------------------------------------------------

    @method
    async def create_rootfs(self, container_id: str, top_layer: str | None = None) -> dict[str, Any]:
        """Mount an overlay of the layers under `top_layer` (None: empty) for a container."""
        check_container_id(container_id)
        if top_layer is not None:
            check_digest(top_layer, "top_layer")
        with self._pinned([top_layer] if top_layer else []):
            async with self._rootfs_locks.hold(container_id):
                return await self._create_rootfs(container_id, top_layer)

    async def _create_rootfs(self, container_id: str, top_layer: str | None) -> dict[str, Any]:
        record = self._containers.get(container_id)
        if record is not None and record.state != CREATED:
            await self._remove(record)
            record = None
        if record is not None and record.top_layer != top_layer:
            raise AlreadyExists(
                f"container {container_id} already has a root file system on layer "
                f"{record.top_layer}, not {top_layer}")
        if record is None:
            root_stat = await asyncio.to_thread(
                os.stat, self._lower_dirs(top_layer)[0] if top_layer else self._layers.empty_dir)
            record = await asyncio.to_thread(
                self._rootfs.create, container_id, top_layer,
                mode=root_stat.st_mode & 0o7777, uid=root_stat.st_uid, gid=root_stat.st_gid)
            self._containers[container_id] = record
            try:
                await self._mount(record)
            except BaseException:
                del self._containers[container_id]
                await asyncio.to_thread(self._rootfs.delete, container_id)
                raise
            log.info("rootfs_created", container_id=container_id, top_layer=top_layer)
        elif not await self._is_mounted(container_id):
            await self._mount(record)
        return self._rootfs_wire(container_id)

    @method
    async def remove_rootfs(self, container_id: str) -> dict[str, Any]:
        """Unmount and delete a container's root file system; a missing one is not an error."""
        check_container_id(container_id)
        async with self._rootfs_locks.hold(container_id):
            record = self._containers.get(container_id)
            if record is None:
                return {"removed": False}
            await self._remove(record)
        log.info("rootfs_removed", container_id=container_id)
        return {"removed": True}

    @method
    async def rootfs_status(self, container_id: str) -> dict[str, Any] | None:
        """Where a container's root file system is and whether it is mounted; None if none."""
        check_container_id(container_id)
        if container_id not in self._containers:
            return None
        return {**self._rootfs_wire(container_id), "mounted": await self._is_mounted(container_id)}

    @method
    async def list_rootfs(self) -> list[dict[str, Any]]:
        return [self._rootfs_wire(cid) for cid in self._containers]

    def _rootfs_wire(self, container_id: str) -> dict[str, Any]:
        record = self._containers[container_id]
        return {
            "container_id": container_id,
            "top_layer": record.top_layer,
            "rootfs": self._rootfs.merged(container_id),
            "upper_dir": self._rootfs.upper(container_id),
            "work_dir": self._rootfs.work(container_id),
        }

    def _lower_dirs(self, top_layer: str) -> list[str]:
        return [self._layers.diff_dir(r.chain_id) for r in LayerStore.chain(self._records, top_layer)]

    async def _mount(self, record: RootfsRecord) -> None:
        if record.top_layer is None:
            lowers = [os.path.relpath(self._layers.empty_dir, self._root)]
        else:
            lowers = [os.path.join("l", r.link) for r in LayerStore.chain(self._records, record.top_layer)]
        cid = record.container_id
        data = overlay.options(lowers, self._rootfs.relative(self._rootfs.upper(cid)),
                               self._rootfs.relative(self._rootfs.work(cid)))
        with tracing.tracer(__name__).start_as_current_span(
                "mount overlay", attributes={"container.id": cid, "overlay.lower_count": len(lowers)}):
            await overlay.mount(self._root, self._rootfs.merged(cid), data)

    async def _is_mounted(self, container_id: str) -> bool:
        points = await asyncio.to_thread(mountinfo.mount_points_under, self._rootfs.dir(container_id))
        return self._rootfs.merged(container_id) in points

    async def _remove(self, record: RootfsRecord) -> None:
        cid = record.container_id
        self._containers[cid] = await asyncio.to_thread(self._rootfs.mark_removing, record)
        merged = self._rootfs.merged(cid)
        for point in await asyncio.to_thread(mountinfo.mount_points_under, self._rootfs.dir(cid)):
            await overlay.unmount(point)
        while await overlay.unmount(merged):
            pass  # stacked mounts
        await asyncio.to_thread(self._rootfs.delete, cid)
        del self._containers[cid]

    # -- usage ------------------------------------------------------------------

    @method
    async def fs_info(self) -> dict[str, Any]:
        """Disk use of the layer store and of the containers' writable layers."""
        uppers = [self._rootfs.upper(cid) for cid in self._containers]
        containers = await asyncio.to_thread(measure_all, uppers)
        return {
            "mountpoint": self._layers.layers_dir,
            "used_bytes": sum(r.used_bytes for r in self._records.values()),
            "inodes_used": sum(r.inodes for r in self._records.values()),
            "layers": len(self._records),
            "timestamp_ns": time.time_ns(),
            "containers": {
                "mountpoint": self._rootfs.rootfs_dir,
                "used_bytes": containers.used_bytes,
                "inodes_used": containers.inodes,
                "count": len(uppers),
            },
        }

    @method
    async def rootfs_usage(self, container_id: str) -> dict[str, Any]:
        """Disk use of a container's writable layer."""
        check_container_id(container_id)
        if container_id not in self._containers:
            raise NotFound(f"container {container_id} has no root file system")
        usage = await asyncio.to_thread(measure, self._rootfs.upper(container_id))
        return {"used_bytes": usage.used_bytes, "inodes_used": usage.inodes,
                "timestamp_ns": time.time_ns(), "upper_dir": self._rootfs.upper(container_id)}

    # -- usage of many containers at once (ListContainerStats) ------------------------

    @method
    async def rootfs_usages(self, container_ids: list[str]) -> dict[str, Any]:
        """{container id: {"used_bytes", "inodes_used", "timestamp_ns", "mountpoint"}} for those with a rootfs."""
        known = [cid for cid in dict.fromkeys(container_ids) if cid in self._containers]
        uppers = {cid: self._rootfs.upper(cid) for cid in known}
        mountpoint = self._rootfs.rootfs_dir

        def measure_all() -> dict[str, Any]:
            out = {}
            for cid, upper in uppers.items():
                usage = measure(upper)
                out[cid] = {"used_bytes": usage.used_bytes, "inodes_used": usage.inodes,
                            "timestamp_ns": time.time_ns(), "mountpoint": mountpoint}
            return out

        return await asyncio.to_thread(measure_all)


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
