"""Container root file systems: overlay mounts of layer stacks."""

import os
import stat
from pathlib import Path

import pytest

from services.storaged import fs_context, overlay
from shared import mountinfo
from shared.errors import AlreadyExists, Internal, InvalidArgument, NotFound, ResourceExhausted
from tests.storaged import support as T

BUSYBOX = Path("/bin/busybox").read_bytes()
CID = "c0ffee" * 10 + "abcd"


def is_mounted(path: str) -> bool:
    return any(m.mount_point == path and m.fstype == "overlay" for m in mountinfo.current())


async def unpack(storaged, blob_dir, *layers, compression="gzip"):
    blobs = [T.write_blob(blob_dir, entries, compression) for entries in layers]
    return (await storaged.unpack(layers=[b.spec() for b in blobs]))["top_layer"]


async def test_whiteouts_and_opaque_dirs_through_the_mount(storaged, blob_dir):
    top = await unpack(
        storaged, blob_dir,
        [T.directory("bin"), T.file("bin/busybox", BUSYBOX, mode=0o755), T.symlink("bin/sh", "busybox"),
         T.directory("a"), T.file("a/deleted", b"1"), T.file("a/kept", b"2"),
         T.directory("b"), T.file("b/old1", b"3"), T.directory("b/sub"), T.file("b/sub/old2", b"4"),
         T.file("c", b"lower"), T.directory("gone-dir"), T.file("gone-dir/x", b"x")],
        [T.file("a/.wh.deleted"), T.file("b/.wh..wh..opq"), T.file("b/new", b"5"),
         T.file("c", b"upper"), T.file(".wh.gone-dir")],
    )
    result = await storaged.create_rootfs(container_id=CID, top_layer=top)
    merged = Path(result["rootfs"])

    assert is_mounted(str(merged))
    assert sorted(os.listdir(merged / "a")) == ["kept"]
    assert sorted(os.listdir(merged / "b")) == ["new"]
    assert (merged / "c").read_bytes() == b"upper"
    assert not (merged / "gone-dir").exists()
    assert (merged / "bin/busybox").read_bytes() == BUSYBOX
    # Writes go to the container's upper dir, never to a layer.
    (merged / "a/kept").write_bytes(b"changed")
    assert (Path(result["upper_dir"]) / "a/kept").read_bytes() == b"changed"
    bottom = (await storaged.layer_status(chain_id=top))["parent"]
    assert (Path(storaged._layers.diff_dir(bottom)) / "a/kept").read_bytes() == b"2"
    usage = await storaged.rootfs_usage(container_id=CID)
    assert usage["used_bytes"] > 0 and usage["inodes_used"] >= 3


async def test_metadata_through_the_mount(storaged, blob_dir):
    top = await unpack(storaged, blob_dir, [
        T.directory("usr/bin"),
        T.file("usr/bin/su", BUSYBOX, mode=0o4755, uid=0, gid=0),
        T.hardlink("usr/bin/su2", "usr/bin/su"),
        T.file("home/file", b"f", mode=0o600, uid=1000, gid=1000),
        T.file("usr/bin/noted", b"n", xattrs={"user.comment": b"hi"}),
    ], compression="zstd")
    merged = Path((await storaged.create_rootfs(container_id=CID, top_layer=top))["rootfs"])
    assert stat.S_IMODE(os.stat(merged / "usr/bin/su").st_mode) == 0o4755
    assert os.stat(merged / "usr/bin/su").st_ino == os.stat(merged / "usr/bin/su2").st_ino
    st = os.stat(merged / "home/file")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o600)
    assert os.getxattr(merged / "usr/bin/noted", "user.comment") == b"hi"


@pytest.fixture(params=["fs_context", "mount program"])
def mounter(request, monkeypatch):
    """Each way of mounting: the file system context API where the kernel has it, else `mount`."""
    if request.param == "fs_context":
        if not fs_context.supported():
            pytest.skip("this kernel lacks overlay's lowerdir+ (Linux 6.8)")
    else:
        monkeypatch.setattr(fs_context, "_supported", False)
    return request.param


async def test_many_layers(storaged, blob_dir, mounter):
    count = 130
    layers = [[T.file(f"layer-{i}", str(i).encode()), T.file("shared", str(i).encode())]
              for i in range(count)]
    top = await unpack(storaged, blob_dir, *layers, compression="tar")
    result = await storaged.create_rootfs(container_id=CID, top_layer=top)
    merged = Path(result["rootfs"])
    assert is_mounted(str(merged))
    assert len([n for n in os.listdir(merged) if n.startswith("layer-")]) == count
    assert (merged / "shared").read_bytes() == str(count - 1).encode()
    assert (merged / "layer-0").read_bytes() == b"0"


async def test_too_many_layers_is_a_clear_error(tmp_path):
    data = overlay.options([f"l/{'A' * 10}"] * 400, "rootfs/x/upper", "rootfs/x/work")
    target = tmp_path / "merged"
    target.mkdir()
    with pytest.raises(ResourceExhausted, match="too many layers"):
        await overlay.mount(str(tmp_path), str(target), data)
    assert not is_mounted(str(target))


async def test_a_refused_mount_says_what_the_kernel_said(tmp_path, mounter):
    for name in ("upper", "work", "merged"):
        (tmp_path / name).mkdir()
    with pytest.raises(Internal, match="mounting the overlay on .*merged failed"):
        await overlay.mount_stack(str(tmp_path), str(tmp_path / "merged"), ["no-such-layer"], "upper", "work")
    assert not is_mounted(str(tmp_path / "merged"))


async def test_empty_rootfs(storaged):
    result = await storaged.create_rootfs(container_id=CID, top_layer=None)
    assert is_mounted(result["rootfs"])
    assert os.listdir(result["rootfs"]) == []
    Path(result["rootfs"], "file").write_text("x")
    assert Path(result["upper_dir"], "file").read_text() == "x"


async def test_create_is_idempotent_and_remove_too(storaged, blob_dir):
    top = await unpack(storaged, blob_dir, [T.file("f", b"f")])
    first = await storaged.create_rootfs(container_id=CID, top_layer=top)
    again = await storaged.create_rootfs(container_id=CID, top_layer=top)
    assert first == again
    assert sum(m.mount_point == first["rootfs"] for m in mountinfo.current()) == 1
    with pytest.raises(AlreadyExists):
        await storaged.create_rootfs(container_id=CID, top_layer=None)
    status = await storaged.rootfs_status(container_id=CID)
    assert status["mounted"] and status["top_layer"] == top

    assert await storaged.remove_rootfs(container_id=CID) == {"removed": True}
    assert not is_mounted(first["rootfs"])
    assert not Path(first["rootfs"]).parent.exists()
    assert await storaged.remove_rootfs(container_id=CID) == {"removed": False}
    assert await storaged.rootfs_status(container_id=CID) is None
    with pytest.raises(NotFound):
        await storaged.rootfs_usage(container_id=CID)


async def test_create_mounts_again_when_unmounted(storaged, blob_dir):
    top = await unpack(storaged, blob_dir, [T.file("f", b"f")])
    result = await storaged.create_rootfs(container_id=CID, top_layer=top)
    Path(result["rootfs"], "mine").write_text("kept")
    overlay.unmount_blocking(result["rootfs"])
    assert not (await storaged.rootfs_status(container_id=CID))["mounted"]
    await storaged.create_rootfs(container_id=CID, top_layer=top)
    assert Path(result["rootfs"], "mine").read_text() == "kept"


async def test_root_dir_takes_the_top_layers_root_attributes(storaged, blob_dir):
    top = await unpack(storaged, blob_dir, [T.directory(".", mode=0o750, uid=7, gid=8), T.file("f")])
    merged = (await storaged.create_rootfs(container_id=CID, top_layer=top))["rootfs"]
    st = os.stat(merged)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (7, 8, 0o750)


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", ".hidden", "x" * 200])
async def test_bad_container_ids(storaged, bad):
    with pytest.raises(InvalidArgument, match="container id"):
        await storaged.create_rootfs(container_id=bad, top_layer=None)
    with pytest.raises(InvalidArgument, match="container id"):
        await storaged.remove_rootfs(container_id=bad)


async def test_missing_layer(storaged):
    with pytest.raises(NotFound, match="not in the layer store"):
        await storaged.create_rootfs(container_id=CID, top_layer="sha256:" + "1" * 64)
    assert await storaged.list_rootfs() == []
    assert os.listdir(Path(storaged._root) / "rootfs") == []


async def test_fs_info(storaged, blob_dir):
    empty = await storaged.fs_info()
    assert empty["used_bytes"] == 0 and empty["inodes_used"] == 0
    top = await unpack(storaged, blob_dir, [T.file("bin/busybox", BUSYBOX)])
    await storaged.create_rootfs(container_id=CID, top_layer=top)
    info = await storaged.fs_info()
    assert info["used_bytes"] >= len(BUSYBOX) and info["inodes_used"] >= 3
    assert info["mountpoint"].startswith(storaged._root)
    assert info["containers"]["count"] == 1 and info["timestamp_ns"] > 0


async def test_gc_layers(storaged, blob_dir):
    base = [T.file("bin/busybox", BUSYBOX)]
    top_a = await unpack(storaged, blob_dir, base, [T.file("a", b"a")])
    top_b = await unpack(storaged, blob_dir, base, [T.file("b", b"b")])
    base_id = (await storaged.layer_status(chain_id=top_a))["parent"]
    assert len(await storaged.list_layers()) == 3

    await storaged.create_rootfs(container_id=CID, top_layer=top_a)
    result = await storaged.gc_layers(keep_top_layers=[top_b])
    assert result["removed"] == []

    await storaged.remove_rootfs(container_id=CID)
    result = await storaged.gc_layers(keep_top_layers=[top_b])
    assert result["removed"] == [top_a] and result["freed_bytes"] > 0
    assert await storaged.layer_status(chain_id=top_a) is None
    assert not Path(storaged._layers.layer_dir(top_a)).exists()
    assert len(os.listdir(Path(storaged._root) / "l")) == 2

    result = await storaged.gc_layers(keep_top_layers=[])
    assert sorted(result["removed"]) == sorted([top_b, base_id])
    root = Path(storaged._root)
    assert os.listdir(root / "layers") == [] and os.listdir(root / "l") == []
    assert os.listdir(root / "trash") == []


async def test_a_slow_removal_holds_up_only_its_own_container(storaged, blob_dir, monkeypatch):
    import asyncio
    import threading

    top = await unpack(storaged, blob_dir, [T.file("bin/busybox", BUSYBOX)])
    other = "beef" * 16
    await storaged.create_rootfs(container_id=CID, top_layer=top)
    entered, release = threading.Event(), threading.Event()
    delete = storaged._rootfs.delete

    def slow_delete(container_id: str) -> None:
        if container_id == CID:
            entered.set()
            release.wait(60)  # as an rmtree of a big writable layer would
        delete(container_id)

    monkeypatch.setattr(storaged._rootfs, "delete", slow_delete)
    removal = asyncio.create_task(storaged.remove_rootfs(container_id=CID))
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        # Another container is made while the removal runs; the same one waits for it.
        again = asyncio.create_task(storaged.create_rootfs(container_id=CID, top_layer=top))
        made = await asyncio.wait_for(storaged.create_rootfs(container_id=other, top_layer=top), 60)
        assert is_mounted(made["rootfs"])
        assert not again.done() and not removal.done()
        # Garbage collection does not wait for the removal either, and spares the layer in use.
        assert (await asyncio.wait_for(storaged.gc_layers(keep_top_layers=[]), 60))["removed"] == []
    finally:
        release.set()
    assert (await removal)["removed"] is True
    assert is_mounted((await again)["rootfs"])
    for cid in (CID, other):
        await storaged.remove_rootfs(container_id=cid)


async def test_layers_of_a_root_file_system_being_made_are_spared_by_garbage_collection(storaged, blob_dir,
                                                                                           monkeypatch):
    import asyncio
    import threading

    top = await unpack(storaged, blob_dir, [T.file("bin/busybox", BUSYBOX)], [T.file("a", b"a")])
    entered, release = threading.Event(), threading.Event()
    create = storaged._rootfs.create

    def slow_create(*args, **kwargs):
        # Not recorded yet: only the creation's pin protects its layers now.
        entered.set()
        release.wait(60)
        return create(*args, **kwargs)

    monkeypatch.setattr(storaged._rootfs, "create", slow_create)
    making = asyncio.create_task(storaged.create_rootfs(container_id=CID, top_layer=top))
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        collected = await asyncio.wait_for(storaged.gc_layers(keep_top_layers=[]), 60)
    finally:
        release.set()
    made = await making
    assert collected["removed"] == []
    assert (Path(made["rootfs"]) / "a").read_bytes() == b"a"
    await storaged.remove_rootfs(container_id=CID)
