"""Image records: list, status, remove semantics, pinning, fs_info, and restarts."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.imaged.records import ImageRecords
from services.imaged.service import Imaged, image_size
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.imaged.conftest import imaged_config, stored_blobs, temp_files
from tests.support import images

ROOT = Path(__file__).resolve().parents[2]


async def pull_ready(service, ref: str) -> dict:
    result = await service.pull(reference=ref)
    await service.mark_ready(image_id=result["image_id"])
    return result


async def test_status_and_list_resolve_ids_prefixes_tags_and_digests(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    img = catalog.multi
    await pull_ready(imaged, img.ref)
    await pull_ready(imaged, catalog.busybox.ref)
    hexid = img.config_digest.split(":")[1]
    for ref in (img.config_digest, hexid, hexid[:12], img.ref, img.digest_ref,
                f"{img.name}:latest@{img.manifest_digest}"):
        status = await imaged.image_status(reference=ref)
        assert status is not None and status["id"] == img.config_digest, ref
    assert await imaged.image_status(reference=f"{img.name}:nope") is None
    assert await imaged.image_status(reference="sha256:" + "0" * 64) is None
    assert [i["id"] for i in await imaged.list_images(reference=img.ref)] == [img.config_digest]
    assert await imaged.list_images(reference=f"{img.name}:nope") == []
    assert {i["id"] for i in await imaged.list_images()} == {img.config_digest, catalog.busybox.config_digest}
    verbose = await imaged.image_status(reference=img.ref, verbose=True)
    assert img.manifest_digest in verbose["blobs"]


async def test_remove_shared_tag_only_untags(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    a, b = catalog.busybox, catalog.busybox_alias
    assert a.config_digest == b.config_digest
    await pull_ready(imaged, a.ref)
    await pull_ready(imaged, b.ref)
    status = await imaged.image_status(reference=a.ref)
    assert sorted(status["repo_tags"]) == sorted([a.ref, b.ref])

    result = await imaged.remove_image(reference=a.ref)
    assert result == {"image_id": a.config_digest, "deleted": False, "untagged": [a.ref]}
    assert await imaged.image_status(reference=a.ref) is None
    assert (await imaged.image_status(reference=b.ref))["repo_tags"] == [b.ref]
    assert set(a.layer_digests) <= stored_blobs(imaged)

    result = await imaged.remove_image(reference=b.ref)
    assert result["deleted"] is True
    assert await imaged.list_images() == []
    assert not set(a.layer_digests) & stored_blobs(imaged)


async def test_remove_by_id_and_by_digest_deletes_whole_image(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    await pull_ready(imaged, catalog.busybox.ref)
    await pull_ready(imaged, catalog.busybox_alias.ref)
    await pull_ready(imaged, catalog.multi.ref)
    result = await imaged.remove_image(reference=catalog.busybox.config_digest)
    assert result["deleted"] is True
    assert sorted(result["untagged"][:2]) == sorted([catalog.busybox.ref, catalog.busybox_alias.ref])
    # The busybox layer is shared with the multi-layer image: it stays; the config goes.
    blobs = stored_blobs(imaged)
    assert catalog.busybox.layer_digests[0] in blobs
    assert catalog.busybox.config_digest not in blobs
    assert catalog.busybox.manifest_digest not in blobs

    result = await imaged.remove_image(reference=catalog.multi.digest_ref)
    assert result["deleted"] is True
    assert await imaged.list_images() == []
    assert stored_blobs(imaged) == set()


async def test_remove_missing_image_is_not_an_error(make_imaged, registry):
    imaged = await make_imaged(registry.host)
    assert (await imaged.remove_image(reference=f"{registry.host}/test/none:latest"))["deleted"] is False
    assert (await imaged.remove_image(reference="sha256:" + "1" * 64))["deleted"] is False


async def test_image_in_use_cannot_be_removed_but_can_be_untagged(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    a, b = catalog.busybox, catalog.busybox_alias
    await pull_ready(imaged, a.ref)
    await pull_ready(imaged, b.ref)
    with pytest.raises(FailedPrecondition) as e:
        await imaged.remove_image(reference=a.config_digest, in_use=[a.config_digest])
    assert "in use" in e.value.message
    assert (await imaged.remove_image(reference=a.ref, in_use=[a.config_digest]))["deleted"] is False
    with pytest.raises(FailedPrecondition):
        await imaged.remove_image(reference=b.ref, in_use=[a.config_digest])
    assert (await imaged.image_status(reference=b.ref))["id"] == a.config_digest


async def test_mark_ready_and_top_layer(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    result = await imaged.pull(reference=catalog.busybox.ref)
    await imaged.set_top_layer(image_id=result["image_id"], top_layer="chain123")
    await imaged.mark_ready(image_id=result["image_id"])
    assert (await imaged.image_status(reference=catalog.busybox.ref))["top_layer"] == "chain123"
    with pytest.raises(NotFound):
        await imaged.mark_ready(image_id="sha256:" + "2" * 64)
    with pytest.raises(NotFound):
        await imaged.set_top_layer(image_id="sha256:" + "2" * 64, top_layer="x")


async def test_size_is_the_layers_uncompressed_once_measured(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    img = catalog.busybox
    built = images.Image([images.busybox_layer()])
    assert built.config_digest == img.config_digest
    result = await pull_ready(imaged, img.ref)
    # Until storaged's measure is recorded, the download size stands in.
    assert (await imaged.image_status(reference=img.ref))["size"] == img.size
    unpacked = len(images.busybox_layer_tar())
    stored = await imaged.set_top_layer(image_id=result["image_id"], top_layer="sha256:" + "3" * 64,
                                        unpacked_size=unpacked)
    # Then CRI-O's sum: config and manifest, and the layers as unpacked.
    expected = len(built.config_bytes()) + len(built.manifest_bytes()) + unpacked
    assert stored["size"] == expected
    assert (await imaged.image_status(reference=img.ref))["size"] == expected
    assert [i["size"] for i in await imaged.list_images(reference=img.ref)] == [expected]
    with pytest.raises(InvalidArgument):
        await imaged.set_top_layer(image_id=result["image_id"], top_layer=None, unpacked_size=-1)


OLD_SCHEMA = """
CREATE TABLE images (id TEXT PRIMARY KEY, manifest_digest TEXT NOT NULL, manifest_media_type TEXT NOT NULL,
    size INTEGER NOT NULL, config TEXT NOT NULL, layers TEXT NOT NULL, blobs TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0, ready INTEGER NOT NULL DEFAULT 0, top_layer TEXT, pulled_ns INTEGER NOT NULL);
CREATE TABLE names (name TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('tag', 'digest')),
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE);
"""


def test_records_from_before_sizes_were_kept_get_a_sensible_size(tmp_path):
    path = tmp_path / "images.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    layers = [{"digest": "sha256:" + "a" * 64, "diff_id": "sha256:" + "b" * 64, "media_type": "x", "size": 700}]
    db.execute("INSERT INTO images VALUES (?, 'sha256:m', 'mt', ?, '{}', ?, '[]', 0, 1, 'sha256:top', 1)",
               ("sha256:" + "1" * 64, 300 + 700, json.dumps(layers)))
    db.commit()
    db.close()
    records = ImageRecords(path)
    try:
        record = records.get("sha256:" + "1" * 64)
        assert record["meta_size"] is None and record["unpacked_size"] is None
        assert image_size(record) == 1000  # not measured yet: the download size
        records.update(record["id"], unpacked_size=5000)
        # Measured: the config (what the old record knows besides the layers) and the layers unpacked.
        assert image_size(records.get(record["id"])) == 300 + 5000
    finally:
        records.close()


async def test_pause_image_is_pinned(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host, pause_image=catalog.busybox.ref)
    await pull_ready(imaged, catalog.busybox.ref)
    await pull_ready(imaged, catalog.multi.ref)
    assert (await imaged.image_status(reference=catalog.busybox.ref))["pinned"] is True
    assert (await imaged.image_status(reference=catalog.multi.ref))["pinned"] is False


async def test_fs_info_counts_real_usage(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    before = await imaged.fs_info()
    await imaged.pull(reference=catalog.busybox.ref)
    after = await imaged.fs_info()
    assert after["mountpoint"] == str(imaged.state_dir)
    assert after["used_bytes"] >= before["used_bytes"] + catalog.busybox.size
    assert after["inodes_used"] >= before["inodes_used"] + 3
    assert after["timestamp_ns"] > 0


async def test_records_survive_a_restart(make_imaged, registry, catalog, tmp_path):
    first = await make_imaged(registry.host)
    await pull_ready(first, catalog.busybox.ref)
    not_ready = await first.pull(reference=catalog.multi.ref)
    await first.stop()
    second = await make_imaged(registry.host)
    assert [i["id"] for i in await second.list_images()] == [catalog.busybox.config_digest]
    # A pull that was fetched but never marked ready completes when repeated.
    again = await second.pull(reference=catalog.multi.ref)
    assert again["image_id"] == not_ready["image_id"]
    await second.mark_ready(image_id=again["image_id"])
    assert len(await second.list_images()) == 2


PULL_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from shared.config import Config
    from services.imaged.service import Imaged

    async def main():
        config = Config()
        config.crio.root = sys.argv[2]
        config.crio.runroot = sys.argv[2] + "-run"
        config.crio.image.registries_conf = ""
        config.crio.image.insecure_registries = [sys.argv[3].split("/")[0]]
        imaged = Imaged(config)
        await imaged.start()
        await imaged.pull(reference=sys.argv[3])

    asyncio.run(main())
""")


async def test_pull_interrupted_by_kill_can_be_repeated(hostile, tmp_path):
    image = images.Image([images.busybox_layer(), images.platform_layer("killed")])
    pushed = hostile.serve_image("kill/img", "latest", image)
    stalled = hostile.routes[f"/v2/kill/img/blobs/{image.layers[0].digest}"]
    stalled.stall_after = 200_000
    root = tmp_path / "root"
    script = tmp_path / "pull.py"
    script.write_text(PULL_SCRIPT)
    tmp_dir = root / "imaged" / "blobs" / "tmp"
    proc = subprocess.Popen([sys.executable, str(script), str(ROOT), str(root), pushed.ref],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (stalled.hits and tmp_dir.exists() and any(tmp_dir.iterdir())):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the pull never started writing its layer"
            await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(tmp_dir.iterdir())  # the killed pull left its partial download behind
    assert not (root / "imaged" / "blobs" / "sha256" / image.layers[0].digest.split(":")[1]).exists()

    stalled.stall_after = None
    config = imaged_config(tmp_path, [hostile.host])
    config.crio.root = str(root)
    imaged = Imaged(config)
    await imaged.start()
    try:
        assert temp_files(imaged) == []
        result = await imaged.pull(reference=pushed.ref)
        assert result["image_id"] == pushed.config_digest
        assert set(pushed.layer_digests) <= stored_blobs(imaged)
    finally:
        await imaged.stop()


async def test_image_with_missing_blobs_is_hidden_until_pulled_again(make_imaged, registry, catalog):
    first = await make_imaged(registry.host)
    await pull_ready(first, catalog.multi.ref)
    await first.stop()
    victim = first.store.path(catalog.multi.layer_digests[1])
    victim.chmod(0o644)
    victim.unlink()
    second = await make_imaged(registry.host)
    assert await second.list_images() == []
    result = await pull_ready(second, catalog.multi.ref)
    assert victim.exists()
    assert [i["id"] for i in await second.list_images()] == [result["image_id"]]
