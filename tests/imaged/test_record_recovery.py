"""Image records across damage: names move only with a ready image."""

from __future__ import annotations

from pathlib import Path

from services.imaged.records import ImageRecords

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
