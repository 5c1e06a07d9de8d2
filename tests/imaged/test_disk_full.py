"""A full image store: pulls and record writes fail with ResourceExhausted naming the file system, leaving nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.imaged.records import ImageRecords
from shared.errors import ResourceExhausted
from tests.imaged.conftest import imaged_config, stored_blobs, temp_files
from tests.support import images
from tests.support.small_fs import fill, resize, tmpfs

pytestmark = pytest.mark.root


async def test_pull_into_a_full_store_leaves_nothing_and_a_retry_succeeds(make_imaged, registry, tmp_path):
    big = images.push_big_image(registry, "test/diskfull", "latest", total_mb=16, layers=2, seed=7)
    config = imaged_config(tmp_path, [registry.host])
    state = Path(config.state_dir("imaged"))
    with tmpfs(state, "6m"):
        imaged = await make_imaged(config=config)
        with pytest.raises(ResourceExhausted) as failure:
            await imaged.pull(reference=big.ref)
        message = failure.value.message
        assert f"file system mounted at {state} (tmpfs)" in message
        assert big.ref in message and "layer sha256:" in message
        # Neither the blobs this pull stored nor a temporary file stays; no record either.
        assert stored_blobs(imaged) == set()
        assert temp_files(imaged) == []
        assert await imaged.list_images() == []
        assert imaged.records.all(ready_only=False) == []

        resize(state, "40m")
        pulled = await imaged.pull(reference=big.ref)
        assert pulled["image_id"] == big.image_id
        assert set(big.layer_digests) <= stored_blobs(imaged)
        await imaged.stop()


async def test_abandon_drops_a_record_that_never_became_ready_and_its_blobs(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    ready = await imaged.pull(reference=catalog.busybox.ref)
    await imaged.mark_ready(image_id=ready["image_id"])
    pulled = await imaged.pull(reference=catalog.multi.ref)

    assert await imaged.abandon(image_id=pulled["image_id"]) == {"image_id": pulled["image_id"], "removed": True}
    assert imaged.records.get(pulled["image_id"]) is None
    # The busybox layer is the ready image's too: it stays; the multi-layer image's own blobs go.
    assert stored_blobs(imaged) == {*catalog.busybox.layer_digests, catalog.busybox.config_digest,
                                    catalog.busybox.manifest_digest}
    # A ready image is never abandoned.
    assert await imaged.abandon(image_id=ready["image_id"]) == {"image_id": ready["image_id"], "removed": False}
    assert (await imaged.image_status(reference=catalog.busybox.ref))["id"] == ready["image_id"]


def _image(n: int, config_bytes: int) -> dict:
    return {"id": f"sha256:{n:064x}", "manifest_digest": f"sha256:{n + 1:064x}",
            "manifest_media_type": images.OCI_MANIFEST, "size": 1, "meta_size": 1,
            "config": {"padding": "x" * config_bytes}, "layers": [], "blobs": []}


def test_a_full_disk_fails_record_writes_with_resource_exhausted(tmp_path):
    with tmpfs(tmp_path / "db", "1m") as directory:
        records = ImageRecords(directory / "images.db")
        try:
            records.store(_image(1, 100), [("example.com/a:latest", "tag")])
            filler = fill(directory)
            with pytest.raises(ResourceExhausted) as failure:
                records.store(_image(2, 256 << 10), [("example.com/b:latest", "tag")])
            assert f"file system mounted at {directory} (tmpfs)" in failure.value.message
            assert "image database" in failure.value.message
            assert records.get(_image(2, 0)["id"]) is None
            assert records.by_name("example.com/b:latest") is None
            with pytest.raises(ResourceExhausted):
                records.update(_image(1, 0)["id"], unpacked_size=1, top_layer="x" * (256 << 10))

            filler.unlink()
            records.store(_image(2, 256 << 10), [("example.com/b:latest", "tag")])
            assert json.dumps(records.by_name("example.com/b:latest")["config"]).count("x") == 256 << 10
            assert records.get(_image(1, 0)["id"])["unpacked_size"] is None
        finally:
            records.close()
