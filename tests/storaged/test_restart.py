"""Restart safety: records reload, mounts are reconciled, interrupted work is cleaned up."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from services.storaged import overlay
from shared import atomic, mountinfo
from services.storaged.service import Storaged
from tests.storaged import support as T

REPO = Path(__file__).resolve().parents[2]
CID = "restart" + "0" * 57


def mounted(path: str) -> int:
    return sum(m.mount_point == path for m in mountinfo.current())


async def restarted(config) -> Storaged:
    service = Storaged(config)
    await service.start()
    return service


async def image(storaged, blob_dir):
    blobs = [T.write_blob(blob_dir, [T.file("bin/busybox", b"bb" * 1000, mode=0o755)]),
             T.write_blob(blob_dir, [T.file("etc/motd", b"hello")], "zstd")]
    return (await storaged.unpack(layers=[b.spec() for b in blobs]))["top_layer"]


async def test_layers_and_mounts_survive_a_restart(storaged, config, blob_dir):
    top = await image(storaged, blob_dir)
    rootfs = (await storaged.create_rootfs(container_id=CID, top_layer=top))["rootfs"]
    Path(rootfs, "written").write_text("by the container")
    layers = await storaged.list_layers()

    # No stop(): as if the process was killed.
    again = await restarted(config)
    assert sorted(map(str, await again.list_layers())) == sorted(map(str, layers))
    assert mounted(rootfs) == 1
    assert (await again.create_rootfs(container_id=CID, top_layer=top))["rootfs"] == rootfs
    assert mounted(rootfs) == 1
    assert Path(rootfs, "written").read_text() == "by the container"
    assert Path(rootfs, "etc/motd").read_text() == "hello"


async def test_unmounted_rootfs_is_mounted_again(storaged, config, blob_dir):
    top = await image(storaged, blob_dir)
    rootfs = (await storaged.create_rootfs(container_id=CID, top_layer=top))["rootfs"]
    Path(rootfs, "written").write_text("kept")
    overlay.unmount_blocking(rootfs)
    assert mounted(rootfs) == 0

    again = await restarted(config)
    assert mounted(rootfs) == 1
    assert Path(rootfs, "written").read_text() == "kept"
    assert (await again.rootfs_status(container_id=CID))["mounted"]


async def test_half_done_removal_is_finished(storaged, config, blob_dir):
    top = await image(storaged, blob_dir)
    rootfs = (await storaged.create_rootfs(container_id=CID, top_layer=top))["rootfs"]
    # Killed right after marking the removal, before unmounting.
    storaged._rootfs.mark_removing(storaged._containers[CID])

    again = await restarted(config)
    assert mounted(rootfs) == 0
    assert not Path(rootfs).parent.exists()
    assert await again.list_rootfs() == []


async def test_stray_mounts_and_leftovers_are_removed(storaged, config, blob_dir):
    top = await image(storaged, blob_dir)
    kept = (await storaged.create_rootfs(container_id=CID, top_layer=top))["rootfs"]
    root = Path(storaged._root)
    # A mount with no record (killed between mount and record, or by hand).
    ghost = root / "rootfs" / "ghost" / "merged"
    ghost.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(ghost)], check=True)
    Path(ghost, "data").write_text("x")
    # A mount inside a leftover temporary directory: cleaning up must not reach into it.
    in_tmp = root / "tmp" / "interrupted" / "diff"
    in_tmp.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(in_tmp)], check=True)
    (root / "trash" / "half-deleted" / "x").mkdir(parents=True)
    # A layer directory without its record, a dangling and a missing short link.
    (root / "layers" / ("f" * 64) / "diff").mkdir(parents=True)
    (root / "l" / "DANGLING00").symlink_to("../layers/" + "e" * 64 + "/diff")
    record = (await storaged.list_layers())[0]
    os.unlink(root / "l" / record["link"])

    again = await restarted(config)
    assert mounted(str(ghost)) == 0 and mounted(str(in_tmp)) == 0
    assert not (root / "rootfs" / "ghost").exists()
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "trash") == []
    assert sorted(os.listdir(root / "layers")) == sorted(
        storaged._layers.layer_dir(r["chain_id"]).rsplit("/", 1)[1] for r in await again.list_layers())
    assert sorted(os.listdir(root / "l")) == sorted(r["link"] for r in await again.list_layers())
    assert os.path.isdir(root / "l" / record["link"])
    assert mounted(kept) == 1


async def test_killed_during_unpack(config, blob_dir, tmp_path):
    # Many small files make the extraction last long enough to be interrupted.
    blob = T.write_blob(blob_dir, [T.directory("many")] +
                        [T.file(f"many/f{i}", b"x" * 100) for i in range(30000)], "gzip")
    script = (
        "import asyncio, sys\n"
        "from shared.config import Config\n"
        "from services.storaged.service import Storaged\n"
        "c = Config(); c.crio.root = sys.argv[1]; c.crio.runroot = sys.argv[2]\n"
        "async def main():\n"
        "    s = Storaged(c); await s.start()\n"
        f"    await s.unpack(layers=[{blob.spec()!r}])\n"
        "asyncio.run(main())\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, config.crio.root, config.crio.runroot],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = Path(config.state_dir("storaged")) / "tmp"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            parts = list(tmp.glob("*/diff/many/*")) if tmp.exists() else []
            if len(parts) > 100:
                break
            await asyncio.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the unpack finished before it could be interrupted"
    assert os.listdir(tmp) != []

    service = await restarted(config)
    try:
        assert os.listdir(tmp) == []
        assert await service.list_layers() == []
        result = await service.unpack(layers=[blob.spec()])
        diff = Path(service._layers.diff_dir(result["top_layer"]))
        assert len(os.listdir(diff / "many")) == 30000
    finally:
        T.unmount_everything_under(tmp_path)


async def test_record_files_are_valid_json(storaged, blob_dir):
    top = await image(storaged, blob_dir)
    await storaged.create_rootfs(container_id=CID, top_layer=top)
    layer = atomic.read_json(os.path.join(storaged._layers.layer_dir(top), "layer.json"))
    assert layer["chain_id"] == top
    rootfs = atomic.read_json(os.path.join(storaged._rootfs.dir(CID), "rootfs.json"))
    assert rootfs["state"] == "created" and rootfs["top_layer"] == top
