"""Image records across damage: names move only with a ready image, a damaged database is set aside and made
again from the records' copies, and an image whose blobs are gone stops being listed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from services.imaged.records import ImageRecords
from shared import metrics
from shared.errors import NotFound
from tests.imaged.conftest import stored_blobs

metrics.enable()  # the counts these tests read exist with metrics on

TAG = "example.com/app:latest"


def image(n: int) -> dict:
    return {"id": f"sha256:{n:064x}", "manifest_digest": f"sha256:{n + 100:064x}",
            "manifest_media_type": "application/vnd.oci.image.manifest.v1+json", "size": 10 + n, "meta_size": 5,
            "config": {"env": [f"N={n}"]}, "layers": [{"digest": f"sha256:{n + 200:064x}", "size": 3}],
            "blobs": [f"sha256:{n + 100:064x}"]}


def ready(records: ImageRecords, n: int, *names: str) -> None:
    records.store(image(n), [(name, "digest" if "@" in name else "tag") for name in names])
    records.update(image(n)["id"], top_layer=f"sha256:{n + 300:064x}", unpacked_size=7)
    assert records.mark_ready(image(n)["id"])


def made(path: Path, *tags: str) -> None:
    """A database with one ready image per tag (images 1, 2...), closed."""
    records = ImageRecords(path)
    for n, tag in enumerate(tags, 1):
        ready(records, n, tag)
    records.close()


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "half" else os.urandom(len(data)))


def counted(kind: str) -> float:
    return metrics.STATE_RECORDS_QUARANTINED.labels(kind)._value.get()


def test_a_tag_moves_only_when_the_new_image_is_ready(tmp_path: Path) -> None:
    records = ImageRecords(tmp_path / "images.db")
    try:
        ready(records, 1, TAG)
        records.store(image(2), [(TAG, "tag")])
        assert records.by_name(TAG)["id"] == image(1)["id"]
        records.delete(image(2)["id"])  # the pull failed and was abandoned
        assert records.by_name(TAG)["id"] == image(1)["id"]
        ready(records, 2, TAG)
        assert records.by_name(TAG)["id"] == image(2)["id"]
        assert records.get(image(1)["id"])["repo_tags"] == []
    finally:
        records.close()


@pytest.mark.parametrize("how", ["half", "garbage"])
def test_a_damaged_database_is_set_aside_and_made_again_from_the_copies(tmp_path: Path, how: str) -> None:
    path = tmp_path / "images.db"
    records = ImageRecords(path)
    ready(records, 1, "example.com/old:latest")
    ready(records, 2, TAG, f"example.com/app@sha256:{102:064x}")
    ready(records, 3, "example.com/other:v1")
    records.store(image(4), [("example.com/pulling:latest", "tag")])  # never ready: no copy
    records.remove_name("example.com/other:v1")
    records.delete(image(1)["id"])
    expected = sorted(records.all(), key=lambda r: r["id"])
    records.close()
    # Made large enough that a cut in half lands in its tables, not only in free pages.
    assert len(expected) == 2 and path.stat().st_size > 8192
    damage(path, how)
    before = counted("image_database")

    again = ImageRecords(path)
    try:
        assert sorted(again.all(), key=lambda r: r["id"]) == expected
        assert again.by_name(TAG)["id"] == image(2)["id"]
        assert again.get(image(4)["id"]) is None
        moved = list((tmp_path / "quarantine").glob("image_database-*/images.db"))
        assert len(moved) == 1 and moved[0].read_bytes() != b""
        assert counted("image_database") == before + 1
        # The new database is healthy and writable.
        ready(again, 5, TAG)
        assert again.by_name(TAG)["id"] == image(5)["id"]
    finally:
        again.close()


def test_names_two_copies_claim_go_to_the_image_pulled_last(tmp_path: Path) -> None:
    path = tmp_path / "images.db"
    made(path, TAG, TAG)
    copies = tmp_path / "records"
    # As if the copy of image 1 was written last, with the tag it had then.
    first = json.loads((copies / f"{1:064x}.json").read_text())
    first["repo_tags"] = [TAG]
    (copies / f"{1:064x}.json").write_text(json.dumps(first))
    path.write_bytes(b"garbage" * 1000)

    again = ImageRecords(path)
    try:
        assert again.by_name(TAG)["id"] == image(2)["id"]
        assert again.get(image(1)["id"])["repo_tags"] == []
    finally:
        again.close()


def test_copies_follow_the_database_and_a_torn_copy_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "images.db"
    made(path, TAG, "example.com/b:1")
    copies = tmp_path / "records"
    damage(copies / f"{1:064x}.json", "half")
    (copies / f"{2:064x}.json").unlink()
    (copies / f"{9:064x}.json").write_text(json.dumps({**image(9), "pulled_ns": 1}))  # of no image
    before = counted("image_record")

    again = ImageRecords(path)
    try:
        assert sorted(p.name for p in copies.iterdir()) == [f"{1:064x}.json", f"{2:064x}.json"]
        assert json.loads((copies / f"{1:064x}.json").read_text())["repo_tags"] == [TAG]
        assert counted("image_record") == before + 1
        assert len(list((tmp_path / "quarantine").glob("image_record-*/*.json"))) == 1
    finally:
        again.close()


async def test_layer_blobs_of_an_image_and_when_they_are_gone(make_imaged, registry, catalog) -> None:
    imaged = await make_imaged(registry.host)
    pulled = await imaged.pull(reference=catalog.multi.ref)
    with pytest.raises(NotFound):
        await imaged.layer_blobs(image_id=pulled["image_id"])  # not ready yet
    await imaged.mark_ready(image_id=pulled["image_id"])
    blobs = await imaged.layer_blobs(image_id=pulled["image_id"])
    assert [l["diff_id"] for l in blobs["layers"]] == catalog.multi.diff_ids
    assert [Path(l["path"]).name for l in blobs["layers"]] == [d.split(":")[1] for d in catalog.multi.layer_digests]
    assert all(Path(l["path"]).is_file() for l in blobs["layers"])

    os.unlink(blobs["layers"][-1]["path"])
    with pytest.raises(NotFound, match="missing"):
        await imaged.layer_blobs(image_id=pulled["image_id"])
    # Not listed any more: the kubelet, finding it absent, pulls it again.
    assert await imaged.image_status(reference=catalog.multi.ref) is None
    again = await imaged.pull(reference=catalog.multi.ref)
    await imaged.mark_ready(image_id=again["image_id"])
    assert set(catalog.multi.layer_digests) <= stored_blobs(imaged)
    assert (await imaged.image_status(reference=catalog.multi.ref))["id"] == pulled["image_id"]
