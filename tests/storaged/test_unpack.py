"""Unpacking layer blobs into the layer store: formats, metadata, verification."""

import asyncio
import os
import stat
import struct
from pathlib import Path

import pytest

from services.storaged.digests import chain_ids
from services.storaged.layer_store import LayerStore
from shared.errors import InvalidArgument, NotFound
from tests.storaged import support as T

BUSYBOX = Path("/bin/busybox").read_bytes()
# security.capability, revision 2, effective, permitted = CAP_NET_RAW (13).
CAP_NET_RAW_EP = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def store_is_clean(storaged) -> None:
    root = Path(storaged._root)
    assert os.listdir(root / "tmp") == []
    assert os.listdir(root / "layers") == []
    assert os.listdir(root / "l") == []


@pytest.mark.parametrize("compression", ["gzip", "zstd", "tar", "docker"])
async def test_unpack_each_compression(storaged, blob_dir, compression):
    entries = [
        T.directory("bin"),
        T.file("bin/busybox", BUSYBOX, mode=0o755),
        T.symlink("bin/sh", "busybox"),
        T.file("./etc/hostname", b"layer\n"),
    ]
    blob = T.write_blob(blob_dir, entries, compression)

    result = await storaged.unpack(layers=[blob.spec()])

    # The layer's size is its uncompressed tar's, whatever the compression (containers/storage's UncompressedSize).
    tar_size = len(T.tar_bytes(entries))
    assert result == {"chain_ids": [blob.diff_id], "top_layer": blob.diff_id,
                      "layer_sizes": [tar_size], "unpacked_size": tar_size}
    diff = Path(storaged._layers.diff_dir(blob.diff_id))
    assert (diff / "bin/busybox").read_bytes() == BUSYBOX
    assert os.readlink(diff / "bin/sh") == "busybox"
    assert (diff / "etc/hostname").read_bytes() == b"layer\n"
    record = await storaged.layer_status(chain_id=blob.diff_id)
    assert record["diff_id"] == blob.diff_id and record["parent"] is None
    assert record["tar_size"] > len(BUSYBOX)


async def test_chain_ids_and_parents(storaged, blob_dir):
    blobs = [T.write_blob(blob_dir, [T.file(f"f{i}", str(i).encode())]) for i in range(3)]
    result = await storaged.unpack(layers=[b.spec() for b in blobs])

    expected = chain_ids([b.diff_id for b in blobs])
    assert result["chain_ids"] == expected
    assert expected[0] == blobs[0].diff_id and expected[1] != blobs[1].diff_id
    parents = [(await storaged.layer_status(chain_id=c))["parent"] for c in expected]
    assert parents == [None, expected[0], expected[1]]
    sizes = [(await storaged.layer_status(chain_id=c))["tar_size"] for c in expected]
    assert result["layer_sizes"] == sizes and result["unpacked_size"] == sum(sizes)
    # A stack's size, for a stack in the store, is its layers' sizes added up.
    missing = "sha256:" + "0" * 64
    assert await storaged.unpacked_sizes(top_layers=[expected[2], expected[1], missing]) == {
        expected[2]: sum(sizes), expected[1]: sizes[0] + sizes[1]}


async def test_metadata_is_kept(storaged, blob_dir):
    blob = T.write_blob(blob_dir, [
        T.directory("etc", mode=0o755, mtime=1_400_000_000),
        T.file("etc/owned", b"data", mode=0o640, uid=1234, gid=5678, mtime=1_500_000_000),
        T.directory("usr/bin"),
        T.file("usr/bin/su", BUSYBOX, mode=0o4755),
        T.file("usr/bin/wall", b"w", mode=0o2755, gid=5),
        T.file("usr/bin/ping", b"p", mode=0o755, xattrs={"security.capability": CAP_NET_RAW_EP}),
        T.file("usr/bin/noted", b"n", xattrs={"user.comment": b"hello", "trusted.overlay.opaque": b"y"}),
        T.hardlink("usr/bin/su-again", "usr/bin/su"),
        T.directory("tmp", mode=0o1777),
        T.directory("home/user", mode=0o700, uid=1000, gid=1000),
        T.symlink("home/user/link", "/etc/owned", uid=1000, gid=1000, mtime=1_300_000_000),
        T.fifo("run-fifo", mode=0o620, uid=3, gid=4),
        T.file("etc/late-child", b"x"),
    ])
    await storaged.unpack(layers=[blob.spec()])
    diff = Path(storaged._layers.diff_dir(blob.diff_id))

    st = os.lstat(diff / "etc/owned")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
    assert st.st_mtime == 1_500_000_000
    # Directory times are set after their children were added.
    assert os.lstat(diff / "etc").st_mtime == 1_400_000_000
    assert stat.S_IMODE(os.lstat(diff / "usr/bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(diff / "usr/bin/wall").st_mode) == 0o2755
    assert os.lstat(diff / "usr/bin/wall").st_gid == 5
    assert os.getxattr(diff / "usr/bin/ping", "security.capability") == CAP_NET_RAW_EP
    assert os.getxattr(diff / "usr/bin/noted", "user.comment") == b"hello"
    # overlayfs's own attributes are never taken from a layer.
    assert "trusted.overlay.opaque" not in os.listxattr(diff / "usr/bin/noted")
    assert os.lstat(diff / "usr/bin/su-again").st_ino == os.lstat(diff / "usr/bin/su").st_ino
    assert os.lstat(diff / "usr/bin/su").st_nlink == 2
    assert stat.S_IMODE(os.lstat(diff / "tmp").st_mode) == 0o1777
    st = os.lstat(diff / "home/user")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o700)
    st = os.lstat(diff / "home/user/link")
    assert stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_mtime) == (1000, 1_300_000_000)
    assert os.readlink(diff / "home/user/link") == "/etc/owned"
    st = os.lstat(diff / "run-fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620 and st.st_uid == 3


async def test_later_entries_replace_earlier_ones(storaged, blob_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"original")
    blob = T.write_blob(blob_dir, [
        T.file("a", b"a"),
        T.hardlink("h", "a"),
        T.file("h", b"new h"),                # must not change "a" through the hard link
        T.symlink("s", str(outside / "victim")),
        T.file("s", b"replaced"),             # replaces the symlink, does not write through it
        T.directory("d"),
        T.file("d/inner", b"i"),
        T.file("d", b"now a file"),           # a directory replaced by a file
        T.file("x", b"x"),
        T.directory("x"),                     # a file replaced by a directory
    ])
    await storaged.unpack(layers=[blob.spec()])
    diff = Path(storaged._layers.diff_dir(blob.diff_id))

    assert (diff / "a").read_bytes() == b"a"
    assert (diff / "h").read_bytes() == b"new h"
    assert not (diff / "s").is_symlink() and (diff / "s").read_bytes() == b"replaced"
    assert (outside / "victim").read_bytes() == b"original"
    assert (diff / "d").read_bytes() == b"now a file"
    assert (diff / "x").is_dir()


async def test_whiteouts_become_overlay_whiteouts(storaged, blob_dir):
    blob = T.write_blob(blob_dir, [
        T.directory("a"),
        T.file("a/.wh.gone"),
        T.directory("b"),
        T.file("b/.wh..wh..opq"),
        T.file("b/kept", b"k"),
        T.file("c/.wh..wh.plnk"),  # aufs bookkeeping: ignored
    ])
    await storaged.unpack(layers=[blob.spec()])
    diff = Path(storaged._layers.diff_dir(blob.diff_id))

    st = os.lstat(diff / "a/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(diff / "b", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(diff / "b")) == ["kept"]
    assert os.listdir(diff / "c") == []
    assert not any(name.startswith(".wh.") for _, dirs, files in os.walk(diff) for name in dirs + files)


async def test_device_nodes_when_allowed(config, blob_dir, tmp_path):
    from services.storaged.service import Storaged

    config.crio.image.allow_device_nodes = True
    service = Storaged(config)
    try:
        await service.start()
        blob = T.write_blob(blob_dir, [T.chardev("dev/null", 1, 3, mode=0o666)])
        await service.unpack(layers=[blob.spec()])
        st = os.lstat(Path(service._layers.diff_dir(blob.diff_id)) / "dev/null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        assert stat.S_IMODE(st.st_mode) == 0o666
    finally:
        T.unmount_everything_under(tmp_path)


async def test_diff_id_mismatch_is_rejected(storaged, blob_dir):
    blob = T.write_blob(blob_dir, [T.file("f", b"content")])
    spec = {**blob.spec(), "diff_id": "sha256:" + "0" * 64}
    with pytest.raises(InvalidArgument, match="diff_id"):
        await storaged.unpack(layers=[spec])
    store_is_clean(storaged)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
async def test_corrupt_blob_is_rejected(storaged, blob_dir, damage):
    blob = T.write_blob(blob_dir, [T.file("f", BUSYBOX)], "gzip")
    data = Path(blob.path).read_bytes()
    Path(blob.path).write_bytes(data[: len(data) // 2] if damage == "truncate"
                                else data[:10] + b"\x00garbage" * 1000)
    with pytest.raises(InvalidArgument, match="gzip"):
        await storaged.unpack(layers=[blob.spec()])
    store_is_clean(storaged)


async def test_not_a_tar_is_rejected(storaged, blob_dir):
    blob_dir.mkdir(parents=True)
    path = blob_dir / "notatar"
    path.write_bytes(b"this is not a tar archive at all" * 100)
    import hashlib
    spec = {"path": str(path), "media_type": T.MEDIA_TYPES["tar"],
            "diff_id": "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()}
    with pytest.raises(InvalidArgument, match="tar"):
        await storaged.unpack(layers=[spec])
    store_is_clean(storaged)


async def test_blob_outside_the_image_store_is_refused(storaged, blob_dir, tmp_path):
    blob = T.write_blob(tmp_path / "elsewhere", [T.file("f", b"x")])
    with pytest.raises(InvalidArgument, match="outside the image store"):
        await storaged.unpack(layers=[blob.spec()])
    # Nor through a symlink placed in the store.
    blob_dir.mkdir(parents=True)
    (blob_dir / "link").symlink_to(blob.path)
    with pytest.raises(InvalidArgument, match="cannot be opened"):
        await storaged.unpack(layers=[{**blob.spec(), "path": str(blob_dir / "link")}])
    store_is_clean(storaged)


@pytest.mark.parametrize("spec,error,match", [
    ({"diff_id": "sha256:abc", "path": "/x", "media_type": "x"}, InvalidArgument, "not a sha256 digest"),
    ({"diff_id": "sha256:" + "a" * 64, "path": "relative", "media_type": ""}, InvalidArgument, "absolute"),
    ({"diff_id": "sha256:" + "a" * 64, "path": "/nonexistent/blob", "media_type": T.MEDIA_TYPES["gzip"]},
     NotFound, "does not exist"),
])
async def test_bad_layer_specs(storaged, spec, error, match):
    with pytest.raises(error, match=match):
        await storaged.unpack(layers=[spec])


async def test_unknown_media_type(storaged, blob_dir):
    blob = T.write_blob(blob_dir, [T.file("f")])
    with pytest.raises(InvalidArgument, match="media type"):
        await storaged.unpack(layers=[{**blob.spec(), "media_type": "application/vnd.example.weird"}])


async def test_shared_layers_are_unpacked_once(storaged, blob_dir, monkeypatch):
    calls = []
    real = LayerStore.unpack

    def counting(self, **kw):
        calls.append(kw["chain_id"])
        return real(self, **kw)

    monkeypatch.setattr(LayerStore, "unpack", counting)
    base = T.write_blob(blob_dir, [T.file("bin/busybox", BUSYBOX, mode=0o755)])
    one = T.write_blob(blob_dir, [T.file("one", b"1")])
    two = T.write_blob(blob_dir, [T.file("two", b"2")])

    a, b, again = await asyncio.gather(
        storaged.unpack(layers=[base.spec(), one.spec()]),
        storaged.unpack(layers=[base.spec(), two.spec()]),
        storaged.unpack(layers=[base.spec(), one.spec()]),
    )
    assert a == again and a["chain_ids"][0] == b["chain_ids"][0] == base.diff_id
    assert sorted(calls) == sorted({*a["chain_ids"], *b["chain_ids"]})
    assert len(calls) == 3
    await storaged.unpack(layers=[base.spec(), two.spec()])
    assert len(calls) == 3
    assert len(os.listdir(Path(storaged._root) / "layers")) == 3


@pytest.mark.parametrize("compression", ["gzip", "zstd", "tar"])
async def test_compression_is_sniffed_without_a_media_type(storaged, blob_dir, compression):
    blob = T.write_blob(blob_dir, [T.file("f", b"sniffed")], compression)
    top = (await storaged.unpack(layers=[{**blob.spec(), "media_type": ""}]))["top_layer"]
    assert (Path(storaged._layers.diff_dir(top)) / "f").read_bytes() == b"sniffed"


async def test_a_failed_unpack_removes_the_layers_it_made(storaged, blob_dir):
    lower = T.write_blob(blob_dir, [T.file("bin/busybox", BUSYBOX, mode=0o755)])
    middle = T.write_blob(blob_dir, [T.file("middle", b"m")])
    top = T.write_blob(blob_dir, [T.file("top", b"t")])
    # The top layer fails after the two below it were unpacked (they are in its chain, unpacked in parallel).
    with pytest.raises(InvalidArgument, match="diff_id"):
        await storaged.unpack(layers=[lower.spec(), middle.spec(), {**top.spec(), "diff_id": "sha256:" + "0" * 64}])
    store_is_clean(storaged)
    assert await storaged.list_layers() == []


async def test_a_failed_unpack_keeps_layers_that_were_there_or_another_call_got(storaged, blob_dir):
    base = T.write_blob(blob_dir, [T.file("bin/busybox", BUSYBOX, mode=0o755)])
    kept = T.write_blob(blob_dir, [T.file("kept", b"k")])
    one = T.write_blob(blob_dir, [T.file("one", b"1")])
    bad = {**T.write_blob(blob_dir, [T.file("bad", b"b")]).spec(), "diff_id": "sha256:" + "0" * 64}
    before = await storaged.unpack(layers=[kept.spec()])

    failed, fine = await asyncio.gather(
        storaged.unpack(layers=[base.spec(), one.spec(), bad]),
        storaged.unpack(layers=[base.spec(), one.spec()]),
        return_exceptions=True)
    assert isinstance(failed, InvalidArgument)
    # The layers the failed call made are the other call's too, and the one already there stays.
    assert {r["chain_id"] for r in await storaged.list_layers()} == {*fine["chain_ids"], *before["chain_ids"]}
    assert os.listdir(Path(storaged._root) / "tmp") == []
    assert len(os.listdir(Path(storaged._root) / "l")) == 3

    with pytest.raises(InvalidArgument):
        await storaged.unpack(layers=[kept.spec(), bad])
    assert {r["chain_id"] for r in await storaged.list_layers()} == {*fine["chain_ids"], *before["chain_ids"]}


async def test_gc_layers_only_among_given_layers(storaged, blob_dir):
    blobs = [T.write_blob(blob_dir, [T.file(f"f{i}", str(i).encode())]) for i in range(3)]
    stack = (await storaged.unpack(layers=[b.spec() for b in blobs]))["chain_ids"]
    alone = (await storaged.unpack(layers=[T.write_blob(blob_dir, [T.file("alone")]).spec()]))["chain_ids"]
    # Asked to drop the whole stack but keep its middle layer as a top: only the top layer goes.
    result = await storaged.gc_layers(keep_top_layers=[stack[1]], only=stack)
    assert result["removed"] == [stack[2]]
    assert {r["chain_id"] for r in await storaged.list_layers()} == {stack[0], stack[1], *alone}
