"""storaged as a real service process: only its declared capabilities, over the bus."""

import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import mountinfo
from services.storaged.service import Storaged
from shared.bus.client import BusClient
from shared.config import Config
from shared.errors import InvalidArgument
from tests.storaged import support as T
from tests.support.stack import REPO, ROOT_AS_FRONTEND, Dirs, remove_dirs, short_tempdir

pytestmark = pytest.mark.root

CAP_NET_RAW_EP = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
CID = "proc" + "1" * 60


class Daemon:
    def __init__(self, dirs: Dirs, *flags: str) -> None:
        self.dirs = dirs
        self.flags = flags
        self.process: subprocess.Popen[bytes] | None = None
        self.log = dirs.base / "storaged.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", *self.dirs.flags(*ROOT_AS_FRONTEND, *self.flags),
                 "service", "storaged"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def dirs():
    d = Dirs(short_tempdir("cps-")).make()
    try:
        yield d
    finally:
        T.unmount_everything_under(d.base)
        remove_dirs(d)


@pytest.fixture
def config(dirs: Dirs) -> Config:
    config = Config()
    config.crio.root = str(dirs.root)
    config.crio.runroot = str(dirs.runroot)
    return config


@pytest.fixture
def daemon_flags() -> tuple[str, ...]:
    return ()


@pytest.fixture
def daemon(dirs: Dirs, daemon_flags: tuple[str, ...]):
    d = Daemon(dirs, *daemon_flags)
    d.start()
    try:
        yield d
    finally:
        d.kill()


@pytest.fixture
async def bus(config: Config, daemon: Daemon):
    client = BusClient.for_service(config, "storaged")
    client.connect()

    async def call(method: str, **params):
        return await client.call(method, deadline=time.time() + 30, **params)

    try:
        yield call
    finally:
        await client.close()


async def test_runs_with_exactly_its_capabilities(bus, daemon):
    health = await bus("health")
    assert health["ready"] and health["pid"] == daemon.process.pid
    assert set(health["capabilities"]) == set(Storaged.declared_capabilities())
    assert "CAP_NET_ADMIN" not in health["capabilities"]
    with open(f"/proc/{daemon.process.pid}/status") as f:
        bounding = next(line for line in f if line.startswith("CapBnd"))
    assert int(bounding.split()[1], 16).bit_count() == len(Storaged.declared_capabilities())


async def test_unpack_and_mount_with_only_those_capabilities(bus, config):
    blob_dir = config.state_dir("imaged") / "blobs"
    base = T.write_blob(blob_dir, [
        T.directory("bin"),
        T.file("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
        T.file("bin/ping", b"p", mode=0o755, xattrs={"security.capability": CAP_NET_RAW_EP}),
        T.file("bin/su", b"s", mode=0o4755),
        T.file("bin/wall", b"w", mode=0o2755, gid=5),
        T.directory("home/user", mode=0o700, uid=1000, gid=1000),
        T.file("home/user/secret", b"mine", mode=0o600, uid=1000, gid=1000),
        T.directory("ro", mode=0o555, uid=7, gid=7),
        T.file("ro/file", b"r", mode=0o444, uid=7, gid=7),
        T.directory("opaque"),
        T.file("opaque/old", b"o"),
        T.file("gone", b"g"),
    ])
    upper = T.write_blob(blob_dir, [
        T.file(".wh.gone"),
        T.file("opaque/.wh..wh..opq"),
        T.file("opaque/new", b"n"),
    ], "zstd")

    top = (await bus("unpack", layers=[base.spec(), upper.spec()]))["top_layer"]
    rootfs = Path((await bus("create_rootfs", container_id=CID, top_layer=top))["rootfs"])

    assert os.getxattr(rootfs / "bin/ping", "security.capability") == CAP_NET_RAW_EP
    assert stat.S_IMODE(os.stat(rootfs / "bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(rootfs / "bin/wall").st_mode) == 0o2755
    st = os.stat(rootfs / "home/user/secret")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o600)
    assert os.listdir(rootfs / "opaque") == ["new"]
    assert not (rootfs / "gone").exists()
    # Copy-up and whiteouts happen with the mounter's (storaged's) credentials.
    (rootfs / "home/user/secret").write_bytes(b"changed")
    (rootfs / "ro/file").unlink()
    (rootfs / "bin/busybox").unlink()
    upper_dir = Path((await bus("rootfs_status", container_id=CID))["upper_dir"])
    assert (upper_dir / "home/user/secret").read_bytes() == b"changed"
    assert os.stat(upper_dir / "home/user/secret").st_uid == 1000
    assert stat.S_ISCHR(os.lstat(upper_dir / "ro/file").st_mode)

    usage = await bus("rootfs_usage", container_id=CID)
    assert usage["used_bytes"] > 0
    info = await bus("fs_info")
    assert info["used_bytes"] > 1_000_000 and info["containers"]["count"] == 1

    assert (await bus("remove_rootfs", container_id=CID))["removed"]
    assert not any(m.mount_point == str(rootfs) for m in mountinfo.current())
    removed = await bus("gc_layers", keep_top_layers=[])
    assert len(removed["removed"]) == 2


async def test_hostile_layer_is_a_typed_error_over_the_bus(bus, config, dirs):
    blob = T.write_blob(config.state_dir("imaged") / "blobs", [
        T.symlink("evil", str(dirs.base)), T.file("evil/pwned", b"x")])
    with pytest.raises(InvalidArgument, match="symbolic link"):
        await bus("unpack", layers=[blob.spec()])
    assert not (dirs.base / "pwned").exists()
    assert await bus("list_layers") == []


async def test_killed_daemon_keeps_layers_and_mounts(bus, config, daemon):
    blob = T.write_blob(config.state_dir("imaged") / "blobs", [T.file("f", b"data")])
    top = (await bus("unpack", layers=[blob.spec()]))["top_layer"]
    rootfs = (await bus("create_rootfs", container_id=CID, top_layer=top))["rootfs"]

    daemon.kill()
    daemon.start()
    # Idempotent calls are retried until the restarted daemon answers.
    assert [layer["chain_id"] for layer in await bus("list_layers")] == [top]
    status = await bus("rootfs_status", container_id=CID)
    assert status["mounted"] and status["rootfs"] == rootfs
    assert sum(m.mount_point == rootfs for m in mountinfo.current()) == 1
    assert Path(rootfs, "f").read_bytes() == b"data"

    await bus("remove_rootfs", container_id=CID)
    assert sum(m.mount_point == rootfs for m in mountinfo.current()) == 0


@pytest.mark.parametrize("daemon_flags", [("--set", "crio.image.allow_device_nodes=true")])
async def test_device_nodes_when_the_configuration_allows_them(bus, config):
    blob = T.write_blob(config.state_dir("imaged") / "blobs", [T.chardev("dev/null", 1, 3)])
    top = (await bus("unpack", layers=[blob.spec()]))["top_layer"]
    rootfs = Path((await bus("create_rootfs", container_id=CID, top_layer=top))["rootfs"])
    st = os.stat(rootfs / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
