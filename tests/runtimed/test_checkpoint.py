"""The checkpoint archive's layout, built from a dump directory the way runc/CRIU leave it."""

from __future__ import annotations

import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from services.runtimed import checkpoint
from shared.errors import InvalidArgument

pytestmark = pytest.mark.root  # a whiteout is a 0:0 character device: mknod needs root


def test_archive_has_images_spec_config_and_the_writable_layer(tmp_path: Path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "process": {"args": ["sleep"]}}))
    work = tmp_path / "work"
    images = work / "checkpoint"
    images.mkdir(parents=True)
    (images / "pages-1.img").write_bytes(b"\0" * 4096)
    (work / "dump.log").write_text("(00.1) Dumping finished successfully\n")
    upper = tmp_path / "upper"
    (upper / "root").mkdir(parents=True)
    (upper / "root" / "notes").write_text("kept")
    os.mknod(upper / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    rec = {"id": "c" * 64, "name": "k8s_c", "image_name": "busybox", "image_id": "sha256:" + "a" * 64,
           "created_at": 5, "bundle": str(bundle)}
    location = tmp_path / "out" / "ckpt.tar"
    location.parent.mkdir()
    checkpoint._write_archive(rec, str(work), str(images), str(upper), str(location))

    with tarfile.open(location) as tar:
        names = set(tar.getnames())
        assert {"checkpoint/pages-1.img", "config.dump", "spec.dump", "rootfs-diff.tar", "deleted.files",
                "dump.log"} <= names
        config = json.load(tar.extractfile("config.dump"))
        assert config["id"] == rec["id"] and config["rootfsImageName"] == "busybox"
        assert json.load(tar.extractfile("spec.dump"))["process"]["args"] == ["sleep"]
        assert json.load(tar.extractfile("deleted.files")) == ["/gone"]
        with tarfile.open(fileobj=tar.extractfile("rootfs-diff.tar")) as diff:
            assert set(diff.getnames()) == {"root", "root/notes"}
    assert stat.S_IMODE(location.stat().st_mode) == 0o600
    assert [p.name for p in location.parent.iterdir()] == ["ckpt.tar"]  # no temporary file left


def test_location_must_be_an_absolute_file_path(tmp_path: Path):
    assert checkpoint.check_location(str(tmp_path / "a.tar")) == str(tmp_path / "a.tar")
    for bad in ("", "rel.tar", str(tmp_path), str(tmp_path / "missing" / "a.tar"), "/tmp/\0x"):
        with pytest.raises(InvalidArgument):
            checkpoint.check_location(bad)
