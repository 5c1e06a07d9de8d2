"""Pulling one image: resolve, pick the endpoint, fetch and verify manifest, config and layers.

Two pulls of the same reference share one task; two pulls that need the
same blob share its download; blobs already in the store are not fetched.
Layers download in parallel, at most `max_parallel_downloads` at once per
pull. The record is stored (not yet ready) only once every blob is stored.
While a pull runs, `progress` tells which of its layers are stored already,
so that the frontend has storaged unpack them before the last one arrives.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import structlog

from services.imaged import auth as auth_mod
from services.imaged import manifest as mf
from services.imaged import reference as refs
from services.imaged.auth import Credentials, TokenCache
from services.imaged.blobstore import BlobStore
from services.imaged.records import ImageRecords
from services.imaged.registries_conf import Endpoint, RegistriesConfFile
from services.imaged.registry_client import HostAuth, RegistryClient
from shared import metrics, tracing
from shared.config import Config
from shared.errors import CriopyError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

log = structlog.get_logger(__name__)


class _Job:
    """One pull in progress: its task, and its layers as they are stored (for `progress`)."""

    def __init__(self) -> None:
        self.task: asyncio.Task[dict[str, Any]] | None = None
        # The layers, bottom first, as the pull's reply lists them; None until the config is read.
        self.layers: list[dict[str, Any]] | None = None
        self.fetched: set[int] = set()
        # Another endpoint (a mirror failing over) gave other layers: progress is not told any more.
        self.changed_layers = False
        self._news = asyncio.Event()

    def start(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self.task = task
        task.add_done_callback(lambda _: self.tell())

    def tell(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    async def news(self) -> None:
        await self._news.wait()

    def describe(self, layers: list[dict[str, Any]]) -> None:
        if self.layers is None:
            self.layers = layers
        elif self.layers != layers:
            self.changed_layers = True
        self.tell()

    def stored(self, index: int) -> None:
        if not self.changed_layers:
            self.fetched.add(index)
            self.tell()


def _first_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class Puller:
    def __init__(self, config: Config, http: httpx.AsyncClient, store: BlobStore, records: ImageRecords,
                 registries: RegistriesConfFile) -> None:
        self.config = config
        self.http = http
        self.store = store
        self.records = records
        self.registries = registries
        self.tokens = TokenCache()
        self.host_auth: dict[str, HostAuth] = {}
        self.platform = mf.parse_platform(config.crio.image.image_platform)
        self.parallel = max(1, config.crio.image.max_parallel_downloads)
        self._pulls: dict[str, _Job] = {}
        self._blobs: dict[str, asyncio.Task[Path]] = {}
        self._blob_waiters: dict[str, int] = {}
        pause = config.crio.image.pause_image
        try:
            parsed = refs.parse(pause) if pause else None
            self.pause_tag = parsed.tagged if isinstance(parsed, refs.Reference) else None
        except InvalidArgument:
            self.pause_tag = None

    def busy_blobs(self) -> set[str]:
        return set(self._blobs)

    async def close(self) -> None:
        tasks = [*(job.task for job in self._pulls.values() if job.task), *self._blobs.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- entry point ---------------------------------------------------------

    async def pull(self, text: str, auth: dict | None) -> dict[str, Any]:
        creds = auth_mod.from_cri(auth)
        conf = self.registries.get()
        candidates = refs.candidates(text, conf.unqualified_search_registries)
        last: CriopyError | None = None
        for ref in candidates:
            try:
                return await self._pull_once(ref, creds)
            except NotFound as e:
                # A short name may live in a later search registry.
                last = e
        assert last is not None
        raise last

    async def progress(self, text: str, auth: dict | None, fetched: int) -> dict[str, Any] | None:
        """The layers of the pull of `text` that runs now, once more than `fetched` of them are stored:
        {"layers": [...as `pull` returns them], "fetched": [their indexes]}. None when no such pull
        runs, or when it will not tell more (it ended, or its layers changed)."""
        creds = auth_mod.from_cri(auth)
        conf = self.registries.get()
        candidates = refs.candidates(text, conf.unqualified_search_registries)
        job = next((j for j in (self._pulls.get(self._key(ref, creds)) for ref in candidates) if j is not None), None)
        if job is None:
            return None
        while job.task is not None and not job.task.done() and not job.changed_layers:
            if job.layers is not None and len(job.fetched) > fetched:
                return {"layers": job.layers, "fetched": sorted(job.fetched)}
            await job.news()
        return None

    @staticmethod
    def _key(ref: refs.Reference, creds: Credentials | None) -> str:
        return f"{ref}|{creds.key() if creds else ''}"

    async def _pull_once(self, ref: refs.Reference, creds: Credentials | None) -> dict[str, Any]:
        key = self._key(ref, creds)
        job = self._pulls.get(key)
        if job is None:
            job = self._pulls[key] = _Job()
            job.start(asyncio.get_running_loop().create_task(self._pull_ref(ref, creds, job), name=f"pull {ref}"))
            job.task.add_done_callback(lambda t: self._forget_pull(key, t))
        else:
            log.info("pull_joined", image=str(ref))
        assert job.task is not None
        # A caller that gives up must not cancel the pull others wait for.
        return await asyncio.shield(job.task)

    def _forget_pull(self, key: str, task: asyncio.Task[dict[str, Any]]) -> None:
        job = self._pulls.get(key)
        if job is not None and job.task is task:
            del self._pulls[key]
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here too, for a pull whose callers all gave up before it ended.
            log.info("pull_failed", pull=key.split("|")[0], error=str(task.exception()))

    async def _pull_ref(self, ref: refs.Reference, creds: Credentials | None, job: _Job) -> dict[str, Any]:
        entry, endpoints = self.registries.get().endpoints(ref)
        if entry is not None and entry.blocked:
            raise PermissionDenied(f"pulling image {ref}: registry {entry.prefix} is blocked in registries.conf")
        last: BaseException | None = None
        for ep in endpoints:
            try:
                return await self._pull_from(ep, ref, creds, job)
            except CriopyError as e:
                if not ep.mirror:
                    raise
                log.warning("mirror_failed", image=str(ref), mirror=ep.host, error=e.message)
                last = e
        raise last if last else NotFound(f"image {ref}: no endpoint to pull from")

    # -- one endpoint --------------------------------------------------------

    async def _pull_from(self, ep: Endpoint, ref: refs.Reference, creds: Credentials | None,
                         job: _Job) -> dict[str, Any]:
        if creds is None:
            creds = await asyncio.to_thread(auth_mod.from_auth_file, self.config.crio.image.global_auth_file,
                                            ep.host, ep.path)
        client = RegistryClient(self.http, self.tokens, self.host_auth, ep, creds, str(ref))
        where = f"image {ref} (registry {ep.host})"
        log.info("pull_started", image=str(ref), registry=ep.host, mirror=ep.mirror)

        body, content_type, top_digest = await client.get_manifest(ref.digest or ref.tag or refs.DEFAULT_TAG)
        meta_blobs = {top_digest: body}
        manifest = mf.parse(body, content_type, where)
        if isinstance(manifest, mf.ManifestIndex):
            desc = mf.select_platform(manifest, self.platform, where)
            body, content_type, digest = await client.get_manifest(desc.digest)
            if len(body) != desc.size:
                raise InvalidArgument(f"{where}: manifest {desc.digest} has {len(body)} bytes, "
                                         f"the index declares {desc.size}")
            meta_blobs[digest] = body
            manifest = mf.parse(body, desc.media_type, where)
            if not isinstance(manifest, mf.ImageManifest):
                raise FailedPrecondition(f"{where}: index entry {desc.digest} is not an image manifest")
        manifest_digest = list(meta_blobs)[-1]

        config_path = await self._blob(client, manifest.config, "config")
        config = mf.image_config(await asyncio.to_thread(config_path.read_bytes), where)
        diff_ids = config.pop("diff_ids")
        if len(diff_ids) != len(manifest.layers):
            raise InvalidArgument(f"{where}: config lists {len(diff_ids)} diff ids for {len(manifest.layers)} layers")

        layers = [{"digest": d.digest, "diff_id": diff, "media_type": d.media_type, "size": d.size}
                  for d, diff in zip(manifest.layers, diff_ids)]
        job.describe([{**l, "path": str(self.store.path(l["digest"]))} for l in layers])
        limit = asyncio.Semaphore(self.parallel)

        async def layer(index: int, d: mf.Descriptor) -> Path:
            async with limit:
                path = await self._blob(client, d, "layer")
            job.stored(index)
            return path

        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(layer(i, d)) for i, d in enumerate(manifest.layers)]
        except BaseExceptionGroup as eg:
            raise _first_error(eg) from None
        paths = [t.result() for t in tasks]

        await asyncio.to_thread(lambda: [self.store.put_verified(d, b, what=f"{where}: manifest {d}")
                                         for d, b in meta_blobs.items()])
        image = {
            "id": manifest.config.digest,
            "manifest_digest": manifest_digest,
            "manifest_media_type": manifest.media_type,
            "size": manifest.config.size + sum(d.size for d in manifest.layers),
            # What CRI-O counts besides the layers: the image's config and manifests.
            "meta_size": manifest.config.size + sum(len(b) for b in meta_blobs.values()),
            "config": config,
            "layers": layers,
            "blobs": [*meta_blobs, manifest.config.digest],
            "pinned": ref.tagged is not None and ref.tagged == self.pause_tag,
        }
        repo_digest = f"{ref.name}@{top_digest}"
        names = [(repo_digest, "digest")]
        if ref.tag and not ref.digest:
            names.insert(0, (ref.tagged, "tag"))
        await asyncio.to_thread(self.records.store, image, names)
        log.info("pull_fetched", image=str(ref), image_id=image["id"], layers=len(layers), size=image["size"])
        return {
            "image_id": image["id"],
            "repo_tag": ref.tagged if ref.tag and not ref.digest else None,
            "repo_digest": repo_digest,
            "layers": [{**l, "path": str(p)} for l, p in zip(layers, paths)],
        }

    async def _blob(self, client: RegistryClient, desc: mf.Descriptor, what: str) -> Path:
        """The stored blob, downloaded once however many pulls need it at the same time."""
        digest, size = desc.digest, desc.size
        if await asyncio.to_thread(self.store.has, digest, size):
            if what == "layer":
                metrics.layer_reused(client.image, digest, size)
            return self.store.path(digest)
        task = self._blobs.get(digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self.store_blob(client, desc, what),
                                                          name=f"blob {digest}")
            self._blobs[digest] = task
            task.add_done_callback(lambda t: self._forget_blob(digest, t))
        self._blob_waiters[digest] = self._blob_waiters.get(digest, 0) + 1
        try:
            return await asyncio.shield(task)
        finally:
            left = self._blob_waiters[digest] - 1
            if left:
                self._blob_waiters[digest] = left
            else:
                del self._blob_waiters[digest]
            if not task.done() and not left:
                # Every pull that wanted it failed or gave up: stop, and let the
                # download remove its temporary file before the failure is reported.
                task.cancel()
                await asyncio.wait({task})

    def _forget_blob(self, digest: str, task: asyncio.Task[Path]) -> None:
        if self._blobs.get(digest) is task:
            del self._blobs[digest]

    async def store_blob(self, client: RegistryClient, desc: mf.Descriptor, what: str) -> Path:
        digest, size = desc.digest, desc.size
        if self.store.has(digest, size):
            return self.store.path(digest)
        self.store.remove(digest)  # a stored blob of the wrong size is damaged
        with tracing.tracer(__name__).start_as_current_span(
                f"download {what}", attributes={"criopy.blob.digest": digest, "criopy.blob.bytes": size,
                                                "criopy.image": client.image}):
            path = await client.fetch_blob(self.store, digest, size, what)
        metrics.blob_downloaded(desc.media_type, size)
        return path
