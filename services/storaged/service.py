"""storaged: unpacked layers, container root filesystems on overlayfs, disk usage."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import structlog

from services.storaged import overlay
from services.storaged.digests import check_digest
from services.storaged.layer_store import LayerRecord, LayerStore
from services.storaged.layer_unpacks import LayerUnpacks
from services.storaged.rootfs_store import CREATED, RootfsRecord, RootfsStore, check_container_id
from services.storaged.usage import measure, measure_all
from shared import faults, mountinfo, tracing
from shared.bus.api import STORAGED
from shared.bus.service import Service, method
from shared.config import Config
from shared.errors import AlreadyExists, CriopyError, InvalidArgument, NotFound
from shared.keyed_locks import KeyedLocks

log = structlog.get_logger(__name__)


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
        self._containers: dict[str, RootfsRecord] = {}
        self._unpacks = LayerUnpacks(self._layers, config, in_use=lambda: [
            r.top_layer for r in self._containers.values() if r.top_layer], mounted=self._layers_under_mounts)
        # One container's root file system changes at a time; different containers' in parallel,
        # so that a big removal (an rmtree of its writable layer) holds up no other creation.
        self._rootfs_locks = KeyedLocks()

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(os.makedirs, self._root, mode=0o711, exist_ok=True)
        containers, broken = await asyncio.to_thread(self._rootfs.load)
        self._containers = containers
        lost = await self._rewrite_mounted(broken)
        # Stray mounts go first: deleting leftovers must never reach into a mount.
        await self._unmount_strays()
        in_use = await asyncio.to_thread(self._layers_under_mounts)
        self._unpacks.records = await asyncio.to_thread(self._layers.load, in_use)
        await asyncio.to_thread(self._drop_held)
        for container_id in lost:
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
        self._unpacks.cancel()

    @property
    def _records(self) -> dict[str, LayerRecord]:
        return self._unpacks.records

    async def _rewrite_mounted(self, broken: list[str]) -> list[str]:
        """Give mounted root file systems whose record was damaged a new one; the ids of the others."""
        mounts = await asyncio.to_thread(self._mounted_links)
        lost = []
        for container_id in broken:
            links = mounts.get(self._rootfs.merged(container_id))
            top = await asyncio.to_thread(self._layers.chain_id_of_link, links[0]) if links else None
            if links is None or (links and top is None):
                lost.append(container_id)
                continue
            self._containers[container_id] = await asyncio.to_thread(self._rootfs.rewrite, container_id, top)
        return lost

    def _mounted_links(self) -> dict[str, list[str]]:
        """{mount point: short link names of its lower dirs, top first} of the overlays mounted in the store."""
        return {point: [lower[2:] for lower in lowers if lower.startswith("l/")]
                for point, lowers in mountinfo.overlay_lowers(self._root).items()}

    def _layers_under_mounts(self) -> set[str]:
        """Chain ids of the layers mounted root file systems use, whatever the records say."""
        return {chain_id for links in self._mounted_links().values() for link in links
                if (chain_id := self._layers.chain_id_of_link(link)) is not None}

    def _drop_held(self) -> None:
        if os.listdir(self._layers.held_dir):
            self._layers.drop_held({link for links in self._mounted_links().values() for link in links})

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

    # -- layers (layer_unpacks.py) ---------------------------------------------

    @method
    async def unpack(self, layers: list[dict], lease: str | None = None,
                     lease_seconds: float | None = None) -> dict[str, Any]:
        """Unpack layer blobs (bottom first) into the store; returns their chain ids and uncompressed sizes.

        With `lease`, the layers of the stack stay out of garbage collection
        after the call, until `release_layers(lease)` or `lease_seconds` (at
        most an hour) have passed: what the caller still has to do before
        another record protects them (imaged's top layer, a root file system).
        """
        if not isinstance(layers, list):
            raise InvalidArgument("layers must be a list")
        return await self._unpacks.unpack(layers, lease, lease_seconds)

    @method
    async def release_layers(self, lease: str) -> dict[str, Any]:
        """End a lease taken by `unpack`: its layers are collectable again. An unknown lease is not an error."""
        return {"released": await self._unpacks.release(lease)}

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
    async def gc_layers(self, keep_top_layers: list[str], only: list[str] | None = None) -> dict[str, Any]:
        """Remove every layer (of `only`, when given) neither in a kept stack nor under a root file system."""
        if not isinstance(keep_top_layers, list):
            raise InvalidArgument("keep_top_layers must be a list")
        if only is not None and not isinstance(only, list):
            raise InvalidArgument("only must be a list")
        tops = [check_digest(t, "keep_top_layers entry") for t in keep_top_layers]
        candidates = None if only is None else {check_digest(c, "only entry") for c in only}
        victims = await self._unpacks.collect(tops, only=candidates)
        return {"removed": [r.chain_id for r in victims],
                "freed_bytes": sum(r.used_bytes for r in victims)}

    # -- root file systems ----------------------------------------------------

    @method
    async def create_rootfs(self, container_id: str, top_layer: str | None = None) -> dict[str, Any]:
        """Mount an overlay of the layers under `top_layer` (None: empty) for a container."""
        check_container_id(container_id)
        if top_layer is not None:
            check_digest(top_layer, "top_layer")
        with self._unpacks.pinned([top_layer] if top_layer else []):
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
            record = await asyncio.to_thread(self._make_rootfs_dirs, container_id, top_layer)
            self._containers[container_id] = record
            try:
                await self._mount(record)
            except BaseException:
                del self._containers[container_id]
                await asyncio.to_thread(self._rootfs.delete, container_id)
                raise
            faults.point("storaged.create_rootfs.after_mount")
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

    def _make_rootfs_dirs(self, container_id: str, top_layer: str | None) -> RootfsRecord:
        """The root file system's directories, its root with the owner and mode of the image's."""
        root_stat = os.stat(self._lower_dirs(top_layer)[0] if top_layer else self._layers.empty_dir)
        return self._rootfs.create(container_id, top_layer, mode=root_stat.st_mode & 0o7777,
                                   uid=root_stat.st_uid, gid=root_stat.st_gid)

    def _lower_dirs(self, top_layer: str) -> list[str]:
        return [self._layers.diff_dir(r.chain_id) for r in LayerStore.chain(self._records, top_layer)]

    async def _mount(self, record: RootfsRecord) -> None:
        if record.top_layer is None:
            lowers = [os.path.relpath(self._layers.empty_dir, self._root)]
        else:
            lowers = [os.path.join("l", r.link) for r in LayerStore.chain(self._records, record.top_layer)]
        cid = record.container_id
        with tracing.tracer(__name__).start_as_current_span(
                "mount overlay", attributes={"container.id": cid, "overlay.lower_count": len(lowers)}):
            await overlay.mount_stack(self._root, self._rootfs.merged(cid), lowers,
                                      self._rootfs.relative(self._rootfs.upper(cid)),
                                      self._rootfs.relative(self._rootfs.work(cid)))

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
        faults.point("storaged.remove_rootfs.after_unmount")
        await asyncio.to_thread(self._rootfs.delete, cid)
        del self._containers[cid]
        await asyncio.to_thread(self._drop_held)

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

