"""imaged: registry pulls, the content-addressed blob store and image records."""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING, Any

import structlog

from services.imaged import reference as refs
from services.imaged.blobstore import BlobStore, disk_usage
from services.imaged.records import ImageRecords
from services.imaged.registries_conf import RegistriesConfFile
from services.imaged.state_feed import ImageFeed
from shared import metrics
from shared.bus.api import IMAGED
from shared.bus.feed import StateFeed
from shared.bus.service import Service, method
from shared.config import Config
from shared.errors import CriopyError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

if TYPE_CHECKING:
    import httpx

    from services.imaged.puller import Puller

log = structlog.get_logger(__name__)

# An id prefix shorter than this is taken for a name, never for an id.
MIN_ID_PREFIX = 12
_ID_PREFIX_RE = re.compile(r"^(?:sha256:)?([a-f0-9]{%d,64})$" % MIN_ID_PREFIX)


def image_size(record: dict[str, Any]) -> int:
    """The size CRI-O reports: config and manifests plus the layers uncompressed.

    Until storaged's measure is recorded (and for images pulled before it was
    kept), the download size stands in.
    """
    if record["unpacked_size"] is None:
        return record["size"]
    meta = record["meta_size"]
    if meta is None:  # recorded before meta sizes were kept: the config is what is known
        meta = record["size"] - sum(layer["size"] for layer in record["layers"])
    return meta + record["unpacked_size"]


def _public(record: dict[str, Any], verbose: bool = False) -> dict[str, Any]:
    config = dict(record["config"])
    out = {
        "id": record["id"],
        "repo_tags": record["repo_tags"],
        "repo_digests": record["repo_digests"],
        "size": image_size(record),
        "unpacked_size": record["unpacked_size"],
        "pinned": record["pinned"],
        "top_layer": record["top_layer"],
        "created": config.pop("created", ""),
        "config": config,
        "layers": record["layers"],
        "manifest_digest": record["manifest_digest"],
    }
    if verbose:
        out["manifest_media_type"] = record["manifest_media_type"]
        out["blobs"] = record["blobs"]
    return out


def _feed_view(record: dict[str, Any]) -> dict[str, Any]:
    """An image as the frontend's read model keeps it: as listed, and when it was pulled (the list's order)."""
    return {**_public(record), "pulled_ns": record["pulled_ns"]}


class Imaged(Service):
    api = IMAGED
    # Talks to registries and writes only its own store: no capability at all.
    capabilities = frozenset()

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.state_dir = config.state_dir("imaged")
        self.store = BlobStore(self.state_dir / "blobs")
        self.registries = RegistriesConfFile(config.crio.image.registries_conf,
                                             config.crio.image.insecure_registries)
        self.records: ImageRecords | None = None
        # The registry side (httpx, the system's CAs) is made at the first pull: an imaged that only
        # answers for the images it has never holds it.
        self.http: httpx.AsyncClient | None = None
        self.puller: Puller | None = None
        self._puller_made = asyncio.Lock()
        # Blobs no record needs are swept only while no pull runs: a pull may
        # be relying on a blob it found present but has not recorded yet.
        self._gc_lock = asyncio.Lock()
        self._active_pulls = 0
        self._gc_pending = False
        self.feed = StateFeed(self.publish)
        self._images_feed = ImageFeed(self.feed, _feed_view)

    # -- life cycle ----------------------------------------------------------

    async def start(self) -> None:
        def prepare() -> ImageRecords:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.store.setup()
            return ImageRecords(self.state_dir / "images.db")

        self.records = await asyncio.to_thread(prepare)
        self.registries.get()  # a broken registries.conf stops start-up with its message
        images = await asyncio.to_thread(self._reconcile_sync)
        # Blobs a killed pull stored, or images lost with a damaged database, left: no record needs them.
        self._gc_pending = True
        await self._sweep_blobs()
        await self._images_feed.refresh(self.records)
        self.feed.start()
        log.info("imaged_started", state_dir=str(self.state_dir), images=len(images),
                 not_ready=sum(1 for i in images if not i["ready"]))
        self.ready = True

    async def _the_puller(self) -> "Puller":
        async with self._puller_made:
            if self.puller is None:
                # In a thread: the imports and reading the CAs take a while.
                self.http, self.puller = await asyncio.to_thread(self._make_puller)
            return self.puller

    def _make_puller(self) -> "tuple[httpx.AsyncClient, Puller]":
        import ssl

        import httpx

        from services.imaged.puller import Puller

        assert self.records is not None
        # System CAs (not a bundled list), as the host's other tools use. No
        # proxy or .netrc from the environment: settings come from the config.
        http = httpx.AsyncClient(
            verify=ssl.create_default_context(), trust_env=False, follow_redirects=True,
            headers={"User-Agent": "crio-py"}, timeout=httpx.Timeout(60.0, connect=15.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))
        return http, Puller(self.config, http, self.store, self.records, self.registries)

    def _reconcile_sync(self) -> list[dict[str, Any]]:
        """Hide images whose blobs went missing from the store, so that the next pull fetches them."""
        assert self.records is not None
        images = self.records.all(ready_only=False)
        for image in images:
            if image["ready"] and self._hide_if_incomplete(image):
                image["ready"] = False
        return images

    def _hide_if_incomplete(self, image: dict[str, Any]) -> bool:
        """Whether blobs of the image are missing; if so it is no longer listed (not ready), to be pulled again."""
        assert self.records is not None
        needed = [(l["digest"], l["size"]) for l in image["layers"]] + [(d, None) for d in image["blobs"]]
        missing = [d for d, size in needed if not self.store.has(d, size)]
        if missing:
            self.records.update(image["id"], ready=0)
            log.warning("image_blobs_missing", image_id=image["id"], missing=missing)
        return bool(missing)

    async def stop(self) -> None:
        self.ready = False
        await self.feed.close()
        puller, http, records = self.puller, self.http, self.records
        self.puller = self.http = self.records = None
        if puller is not None:
            await puller.close()
        if http is not None:
            await http.aclose()
        if records is not None:
            await asyncio.to_thread(records.close)

    # -- resolution ----------------------------------------------------------

    def _resolve_sync(self, text: str) -> dict[str, Any] | None:
        """The record `text` names: an image id, a tag, a digest, or a unique id prefix."""
        assert self.records is not None
        if not isinstance(text, str) or not text:
            raise InvalidArgument("image reference is empty")
        image_id = refs.image_id_of(text)
        if image_id is not None:
            return self.records.get(image_id)
        try:
            candidates = refs.candidates(text, self.registries.get().unqualified_search_registries)
        except InvalidArgument:
            candidates = []
            if not _ID_PREFIX_RE.match(text):
                raise
        for ref in candidates:
            record = self.records.by_name(ref.digested if ref.digest else ref.tagged)  # type: ignore[arg-type]
            if record is not None:
                return record
        m = _ID_PREFIX_RE.match(text)
        if m:
            found = self.records.by_id_prefix(f"sha256:{m.group(1)}")
            if len(found) == 1:
                return found[0]
        return None

    async def _resolve(self, text: str, *, ready_only: bool = True) -> dict[str, Any] | None:
        record = await asyncio.to_thread(self._resolve_sync, text)
        if record is not None and ready_only and not record["ready"]:
            return None
        return record

    # -- the bus API -----------------------------------------------------------

    @method
    async def pull(self, reference: str, auth: dict | None = None) -> dict:
        """Fetch and verify an image into the store; its record is not listed until mark_ready."""
        puller = await self._the_puller()
        async with self._gc_lock:
            self._active_pulls += 1
        started = time.monotonic()
        outcome = "success"
        try:
            return await puller.pull(reference, auth)
        except CriopyError as e:
            outcome = e.code.lower()
            if isinstance(e, ResourceExhausted):
                # The blobs this pull did store take room the disk lacks, and no record
                # lists them for image removal to free: they go (a retry fetches them again).
                self._gc_pending = True
            raise
        finally:
            metrics.IMAGE_PULLS.labels(outcome).inc()
            metrics.IMAGE_PULL_DURATION.observe(time.monotonic() - started)
            self._active_pulls -= 1
            # A pull of an image already listed refreshes its record (when it was pulled, its size).
            await self._images_feed.refresh(self.records)
            if self._active_pulls == 0 and self._gc_pending:
                await self._sweep_blobs()

    async def _sweep_blobs(self) -> None:
        async with self._gc_lock:
            if self._active_pulls or not self._gc_pending:
                return
            self._gc_pending = False
            removed = await asyncio.to_thread(self._sweep_sync)
        if removed:
            log.info("blobs_removed", count=removed)

    def _sweep_sync(self) -> int:
        assert self.records is not None
        keep = self.records.referenced_blobs()
        removed = 0
        for digest in self.store.digests() - keep:
            self.store.remove(digest)
            removed += 1
        return removed

    @method
    async def pull_progress(self, reference: str, auth: dict | None = None, fetched: int = 0) -> dict | None:
        """Of the pull of `reference` that runs now, its layers once more than `fetched` of them are
        stored ({"layers", "fetched": indexes}); None when no such pull runs or it will tell no more."""
        puller = await self._the_puller()  # asked while the pull it follows may still be making it
        return await puller.progress(reference, auth, fetched)

    @method
    async def mark_ready(self, image_id: str) -> dict:
        """List the image, and move to it the names (tags, digests) its pulls asked for."""
        assert self.records is not None
        if not await asyncio.to_thread(self.records.mark_ready, image_id):
            raise NotFound(f"image {image_id} not found")
        await self._images_feed.refresh(self.records)
        return {"image_id": image_id, "ready": True}

    @method
    async def abandon(self, image_id: str) -> dict:
        """Undo a pull that failed after its fetch: drop its record, unless ready, and the blobs only it needed.

        The names the pull asked for stay where they were.
        """
        assert self.records is not None
        record = await asyncio.to_thread(self.records.get, image_id)
        if record is None:
            return {"image_id": image_id, "removed": False}
        if record["ready"]:
            await asyncio.to_thread(self.records.update, image_id, pending_names=None)
            return {"image_id": image_id, "removed": False}
        await asyncio.to_thread(self.records.delete, image_id)
        await self._images_feed.refresh(self.records)
        self._gc_pending = True
        await self._sweep_blobs()
        log.info("image_pull_abandoned", image_id=image_id)
        return {"image_id": image_id, "removed": True}

    @method
    async def layer_blobs(self, image_id: str) -> dict:
        """A ready image's layers with the paths of their blobs, for storaged to unpack them again.

        An image some of whose blobs are gone is no longer listed (NotFound):
        the kubelet, finding it absent, pulls it again.
        """
        assert self.records is not None
        record = await asyncio.to_thread(self.records.get, image_id)
        if record is None or not record["ready"]:
            raise NotFound(f"image {image_id} is not pulled")
        if await asyncio.to_thread(self._hide_if_incomplete, record):
            await self._images_feed.refresh(self.records)
            raise NotFound(f"image {image_id} is not pulled any more: blobs of it are missing from the store")
        return {"image_id": image_id, "top_layer": record["top_layer"],
                "layers": [{**l, "path": str(self.store.path(l["digest"]))} for l in record["layers"]]}

    @method
    async def set_top_layer(self, image_id: str, top_layer: str | None,
                            unpacked_size: int | None = None) -> dict:
        """Record where storaged unpacked the image, and its layers' uncompressed size; returns its size."""
        assert self.records is not None
        if unpacked_size is not None and (not isinstance(unpacked_size, int) or unpacked_size < 0):
            raise InvalidArgument(f"unpacked_size must be a count of bytes, not {unpacked_size!r:.50}")
        fields: dict[str, Any] = {"top_layer": top_layer}
        if unpacked_size is not None:
            fields["unpacked_size"] = unpacked_size
        if not await asyncio.to_thread(self.records.update, image_id, **fields):
            raise NotFound(f"image {image_id} not found")
        await self._images_feed.refresh(self.records)
        record = await asyncio.to_thread(self.records.get, image_id)
        return {"image_id": image_id, "top_layer": top_layer, "size": image_size(record) if record else None}

    @method
    async def image_status(self, reference: str, verbose: bool = False) -> dict | None:
        record = await self._resolve(reference)
        return None if record is None else _public(record, verbose)

    @method
    async def list_images(self, reference: str | None = None) -> list[dict]:
        assert self.records is not None
        if reference:
            record = await self._resolve(reference)
            return [] if record is None else [_public(record)]
        return [_public(r) for r in await asyncio.to_thread(self.records.all)]

    @method
    async def remove_image(self, reference: str, in_use: list[str] | None = None) -> dict:
        """Remove an image by id, tag or digest; a tag that other tags share is only untagged.

        `in_use` lists image ids that containers use: removing one of those
        fails (untagging it does not). A missing image is not an error.
        """
        assert self.records is not None
        records = self.records
        record = await self._resolve(reference, ready_only=False)
        if record is None:
            return {"image_id": None, "deleted": False, "untagged": []}
        by_tag = None
        if refs.image_id_of(reference) is None and not _ID_PREFIX_RE.match(reference):
            for ref in refs.candidates(reference, self.registries.get().unqualified_search_registries):
                if not ref.digest and ref.tagged in record["repo_tags"]:
                    by_tag = ref.tagged
        if by_tag is not None and len(record["repo_tags"]) > 1:
            await asyncio.to_thread(records.remove_name, by_tag)
            await self._images_feed.refresh(records)
            log.info("image_untagged", image_id=record["id"], tag=by_tag)
            return {"image_id": record["id"], "deleted": False, "untagged": [by_tag]}
        if record["id"] in (in_use or []):
            raise FailedPrecondition(
                f"image {reference} ({record['id']}) is in use by a container and cannot be removed")
        await asyncio.to_thread(records.delete, record["id"])
        await self._images_feed.refresh(records)
        self._gc_pending = True
        await self._sweep_blobs()
        log.info("image_removed", image_id=record["id"], names=record["repo_tags"] + record["repo_digests"])
        return {"image_id": record["id"], "deleted": True,
                "untagged": record["repo_tags"] + record["repo_digests"], "top_layer": record["top_layer"]}

    @method
    async def top_layers(self) -> list[str]:
        """The top layer of every image, ready or still being pulled: what storaged must keep."""
        assert self.records is not None
        records = await asyncio.to_thread(self.records.all, ready_only=False)
        return sorted({r["top_layer"] for r in records if r["top_layer"]})

    @method
    async def snapshot(self, marker: str = "") -> dict:
        """Every ready image as the frontend's read model keeps them (state_feed.py)."""
        return self.feed.snapshot(marker)

    @method
    async def fs_info(self) -> dict:
        used, inodes = await asyncio.to_thread(disk_usage, self.state_dir)
        return {"mountpoint": str(self.state_dir), "used_bytes": used, "inodes_used": inodes,
                "timestamp_ns": time.time_ns()}
