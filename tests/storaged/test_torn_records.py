"""Records found torn or garbage at start (a power cut): moved aside, counted, and what can be is rebuilt.

A layer whose record is lost is deleted (it is unpacked again from imaged's blobs), unless a mounted
root file system uses it: then it stays for that mount only. A mounted root file system whose record is
lost gets a new one from the mount table; an unmounted one is deleted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.storaged.service import Storaged
from shared import metrics
from shared.errors import NotFound
from tests.storaged import support as T
from tests.storaged.test_restart import mounted, restarted

metrics.enable()  # the counts these tests read exist with metrics on

CID = "torn" + "0" * 60
OTHER = "torn" + "1" * 60


def damage(path: str | os.PathLike[str], how: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2] if how == "half" else os.urandom(len(data)))


def quarantined(storaged: Storaged, kind: str) -> list[str]:
    directory = Path(storaged._root) / "quarantine"
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f"{kind}-")) if directory.is_dir() else []


def counted(kind: str) -> float:
    return metrics.STATE_RECORDS_QUARANTINED.labels(kind)._value.get()


def two_layers(blob_dir: Path) -> list[dict]:
    return [T.write_blob(blob_dir, [T.file("bin/tool", b"tool" * 1000, mode=0o755)]).spec(),
            T.write_blob(blob_dir, [T.file("etc/motd", b"hello")], "zstd").spec()]


@pytest.mark.parametrize("how", ["half", "garbage"])
async def test_torn_layer_records_are_set_aside_and_their_layers_deleted(storaged, config, blob_dir, how):
    specs = two_layers(blob_dir)
    unpacked = await storaged.unpack(layers=specs)
    for chain_id in unpacked["chain_ids"]:
        damage(os.path.join(storaged._layers.layer_dir(chain_id), "layer.json"), how)
    before = counted("layer")

    again = await restarted(config)
    assert await again.list_layers() == []
    root = Path(again._root)
    assert os.listdir(root / "layers") == [] and os.listdir(root / "l") == []
    assert len(quarantined(again, "layer")) == 2
    assert counted("layer") == before + 2
    # Unpacked again from the blobs, as the frontend does when a container needs them.
    assert (await again.unpack(layers=specs))["chain_ids"] == unpacked["chain_ids"]
    rootfs = (await again.create_rootfs(container_id=CID, top_layer=unpacked["top_layer"]))["rootfs"]
    assert Path(rootfs, "etc/motd").read_text() == "hello"


async def test_a_torn_layer_under_a_mounted_root_fs_is_held_for_it_alone(storaged, config, blob_dir):
    specs = two_layers(blob_dir)
    unpacked = await storaged.unpack(layers=specs)
    bottom, top = unpacked["chain_ids"]
    rootfs = (await storaged.create_rootfs(container_id=CID, top_layer=top))["rootfs"]
    Path(rootfs, "written").write_text("by the container")
    damage(os.path.join(storaged._layers.layer_dir(top), "layer.json"), "garbage")

    again = await restarted(config)
    root = Path(again._root)
    # The running container's files are all there, its mount untouched.
    assert mounted(rootfs)
    assert Path(rootfs, "etc/motd").read_text() == "hello" and Path(rootfs, "bin/tool").read_bytes() == b"tool" * 1000
    assert Path(rootfs, "written").read_text() == "by the container"
    assert [r["chain_id"] for r in await again.list_layers()] == [bottom]
    assert len(os.listdir(root / "held")) == 1 and len(quarantined(again, "layer")) == 1
    # Nothing collects what the mount uses, though the chain of records from its top is broken.
    assert (await again.gc_layers(keep_top_layers=[]))["removed"] == []
    # No new root file system gets the held layer: the stack is unpacked again for it.
    with pytest.raises(NotFound, match="not in the layer store"):
        await again.create_rootfs(container_id=OTHER, top_layer=top)
    await again.unpack(layers=specs)
    other = (await again.create_rootfs(container_id=OTHER, top_layer=top))["rootfs"]
    assert Path(other, "etc/motd").read_text() == "hello"
    assert Path(rootfs, "etc/motd").read_text() == "hello"

    # Once its mount is gone, the held layer goes too.
    await again.remove_rootfs(container_id=CID)
    assert os.listdir(root / "held") == []
    assert all((root / "l" / link).exists() for link in os.listdir(root / "l"))
    assert Path(other, "etc/motd").read_text() == "hello"


async def test_a_torn_record_of_a_mounted_root_fs_is_written_again_from_the_mount(storaged, config, blob_dir):
    unpacked = await storaged.unpack(layers=two_layers(blob_dir))
    rootfs = (await storaged.create_rootfs(container_id=CID, top_layer=unpacked["top_layer"]))["rootfs"]
    Path(rootfs, "written").write_text("kept")
    damage(os.path.join(storaged._rootfs.dir(CID), "rootfs.json"), "half")
    before = counted("rootfs")

    again = await restarted(config)
    status = await again.rootfs_status(container_id=CID)
    assert status["mounted"] and status["top_layer"] == unpacked["top_layer"]
    assert Path(rootfs, "written").read_text() == "kept"
    assert len(quarantined(again, "rootfs")) == 1 and counted("rootfs") == before + 1
    # Its layers are still kept by it, and it is removed as any other.
    assert (await again.gc_layers(keep_top_layers=[]))["removed"] == []
    assert (await again.create_rootfs(container_id=CID, top_layer=unpacked["top_layer"]))["rootfs"] == rootfs
    await again.remove_rootfs(container_id=CID)
    assert not mounted(rootfs) and not Path(rootfs).parent.exists()


async def test_a_torn_record_of_an_unmounted_root_fs_deletes_it(storaged, config, blob_dir):
    unpacked = await storaged.unpack(layers=two_layers(blob_dir))
    rootfs = (await storaged.create_rootfs(container_id=CID, top_layer=unpacked["top_layer"]))["rootfs"]
    T.unmount_everything_under(Path(storaged._root))  # as after a reboot
    damage(os.path.join(storaged._rootfs.dir(CID), "rootfs.json"), "garbage")

    again = await restarted(config)
    assert await again.list_rootfs() == []
    assert not Path(rootfs).parent.exists()
    assert len(quarantined(again, "rootfs")) == 1
    # Nothing holds its layers any more.
    assert sorted((await again.gc_layers(keep_top_layers=[]))["removed"]) == sorted(unpacked["chain_ids"])
