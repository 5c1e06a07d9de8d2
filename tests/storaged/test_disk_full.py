"""Unpacking into a layer store whose file system fills up: ResourceExhausted naming it, nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.storaged.service import Storaged
from shared.config import Config
from shared.errors import ResourceExhausted
from tests.storaged import support as T
from tests.support.small_fs import fill, resize, tmpfs

pytestmark = pytest.mark.root

BUSYBOX = Path("/bin/busybox").read_bytes()


def store_is_clean(root: Path) -> None:
    for sub in ("tmp", "layers", "l", "trash"):
        assert os.listdir(root / sub) == [], sub


async def test_a_layer_that_does_not_fit(config: Config, blob_dir: Path, tmp_path: Path):
    store = Path(config.state_dir("storaged"))
    with tmpfs(store, "4m"):
        storaged = Storaged(config)
        await storaged.start()
        try:
            # Compressed, the big layer is a few KiB: only its unpacked files do not fit.
            layers = [T.write_blob(blob_dir, [T.file("bin/busybox", BUSYBOX, mode=0o755)]),
                      T.write_blob(blob_dir, [T.file("small", b"s")]),
                      T.write_blob(blob_dir, [T.directory("data"), T.file("data/zeros", bytes(8 << 20))])]
            assert os.path.getsize(layers[2].path) < 64 << 10

            with pytest.raises(ResourceExhausted) as failure:
                await storaged.unpack(layers=[b.spec() for b in layers])
            assert f"file system mounted at {store} (tmpfs)" in failure.value.message
            assert "unpacking layer" in failure.value.message
            store_is_clean(store)
            assert await storaged.list_layers() == []

            resize(store, "32m")
            result = await storaged.unpack(layers=[b.spec() for b in layers])
            assert len(await storaged.list_layers()) == 3
            assert (Path(storaged._layers.diff_dir(result["top_layer"])) / "data/zeros").stat().st_size == 8 << 20
        finally:
            await storaged.stop()


async def test_a_root_file_system_on_a_full_disk(config: Config, tmp_path: Path):
    store = Path(config.state_dir("storaged"))
    with tmpfs(store, "1m"):
        storaged = Storaged(config)
        await storaged.start()
        try:
            filler = fill(store)
            with pytest.raises(ResourceExhausted) as failure:
                await storaged.create_rootfs(container_id="c1")
            assert f"file system mounted at {store} (tmpfs)" in failure.value.message
            assert "container c1" in failure.value.message
            assert await storaged.list_rootfs() == []
            assert os.listdir(store / "rootfs") == [] and os.listdir(store / "tmp") == []

            filler.unlink()
            created = await storaged.create_rootfs(container_id="c1")
            assert (await storaged.rootfs_status(container_id="c1"))["mounted"]
            assert created["rootfs"].startswith(str(store))
            await storaged.remove_rootfs(container_id="c1")
        finally:
            await storaged.stop()
            T.unmount_everything_under(tmp_path)
