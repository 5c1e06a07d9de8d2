"""Fixtures for runtimed: a Runtimed instance on temp dirs, a busybox rootfs, pod/container configs."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from services.runtimed import cgroups
from shared import mountinfo, mounts
from services.runtimed.service import Runtimed
from shared.config import Config

pytestmark = pytest.mark.root

APPLETS = ["sh", "sleep", "cat", "echo", "id", "ls", "true", "false", "grep", "head", "tail", "touch",
           "mkdir", "rm", "ps", "kill", "dd", "unshare", "env", "pwd", "hostname", "wc", "yes", "seq",
           "test", "tr", "cut", "awk", "printf", "stat", "mount", "swapoff"]


def make_rootfs(path: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "etc").mkdir()
    (path / "tmp").mkdir(mode=0o1777)
    shutil.copy2("/bin/busybox", path / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", path / "bin" / applet)
    (path / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "alice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
        "bob:x:1001:1001::/home/bob:/bin/sh\n")
    (path / "etc" / "group").write_text(
        "root:x:0:\n"
        "alice:x:1000:\n"
        "bob:x:1001:\n"
        "staff:x:50:alice,bob\n"
        "video:x:44:alice\n")
    return path


@pytest.fixture
def base_dir() -> Any:
    base = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    try:
        yield base
    finally:
        _unmount_under(str(base))
        shutil.rmtree(base, ignore_errors=True)


def _unmount_under(prefix: str) -> None:
    for info in sorted(mountinfo.current(), key=lambda m: len(m.mount_point), reverse=True):
        if info.mount_point.startswith(prefix + "/"):
            try:
                mounts.unmount(info.mount_point)
            except OSError:
                pass


@pytest.fixture
def cgroup_parent() -> Any:
    parent = f"/criopy-test-{secrets.token_hex(4)}"
    try:
        yield parent
    finally:
        _kill_cgroup(parent)
        asyncio.run(cgroups.remove_dirs(cgroups.tree_dirs(parent), timeout=2.0))


def _kill_cgroup(parent: str) -> None:
    """Kill whatever a failed test left in the test's cgroup tree."""
    for top in cgroups.controller_dirs(parent):
        for root, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                try:
                    pids = Path(root, "cgroup.procs").read_text().split()
                except OSError:
                    continue
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass


def make_config(base: Path, **runtime: Any) -> Config:
    config = Config()
    config.crio.root = str(base / "root")
    config.crio.runroot = str(base / "run")
    config.crio.log_dir = str(base / "logs")
    for key, value in runtime.items():
        setattr(config.crio.runtime, key, value)
    return config


@pytest.fixture
async def runtimed(base_dir: Path, cgroup_parent: str) -> AsyncIterator[Runtimed]:
    service = Runtimed(make_config(base_dir, pids_limit=64))
    await service.start()
    try:
        yield service
    finally:
        leaks = await cleanup(service, base_dir, cgroup_parent)
    assert leaks == [], f"left behind after removing every pod: {leaks}"


class Lives:
    """One runtimed after another on the same state, as across restarts; the last one is cleaned up."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.config = make_config(base)
        self.current: Runtimed | None = None

    async def start(self) -> Runtimed:
        service = Runtimed(self.config)
        await service.start()
        self.current = service
        return service

    async def stop(self) -> None:
        """Stop the current runtimed the way a restart does; its containers go on under conmon."""
        assert self.current is not None
        await self.current.stop()
        self.current = None


@pytest.fixture
async def lives(base_dir: Path, cgroup_parent: str) -> AsyncIterator[Lives]:
    # Depends on cgroup_parent so that it is cleaned up before the cgroups are.
    runs = Lives(base_dir)
    try:
        yield runs
    finally:
        if runs.current is not None:
            await cleanup(runs.current, base_dir)


async def cleanup(service: Runtimed, base: Path, cgroup_parent: str | None = None) -> list[str]:
    """Remove every pod and container; return what is left of them on the machine, then force it away."""
    leaks: list[str] = []
    try:
        for sb in list(service.sandboxes):
            await service.remove_sandbox(sandbox_id=sb)
        for c in list(service.containers):
            await service.remove_container(container_id=c)
        leaks += [f"conmon pid {p}" for p in conmon_pids(base)]
        leaks += [f"mount {m.mount_point}" for m in mountinfo.current() if m.mount_point.startswith(str(base) + "/")]
        if cgroup_parent:
            for top in cgroups.controller_dirs(cgroup_parent):
                if os.path.isdir(top):
                    leaks += [f"cgroup {os.path.join(top, d)}" for d in os.listdir(top)
                              if os.path.isdir(os.path.join(top, d))]
        runc_root = os.path.join(service.ctx.state_dir, "runc")
        if os.path.isdir(runc_root):
            leaks += [f"runc container {c}" for c in os.listdir(runc_root)]
    finally:
        await service.stop()
        runc_root = os.path.join(service.ctx.state_dir, "runc")
        if os.path.isdir(runc_root):
            for cid in os.listdir(runc_root):
                subprocess.run(["runc", "--root", runc_root, "delete", "--force", cid], capture_output=True)
        for pid in conmon_pids(base):
            os.kill(pid, signal.SIGKILL)
    return leaks


def conmon_pids(base: Path) -> list[int]:
    """conmon processes whose command line names this test's directories."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"conmon") and any(str(base).encode() in a for a in cmdline):
            pids.append(int(entry))
    return pids


@pytest.fixture
def rootfs_factory(base_dir: Path) -> Callable[[], str]:
    def make() -> str:
        return str(make_rootfs(base_dir / f"rootfs-{secrets.token_hex(3)}"))
    return make


@pytest.fixture
def rootfs(rootfs_factory: Callable[[], str]) -> str:
    return rootfs_factory()


def pod_config(cgroup_parent: str, name: str = "pod", *, pid: str = "CONTAINER", network: str = "POD",
               **extra: Any) -> dict[str, Any]:
    ns = {"network": network, "pid": pid}
    config: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "default", "uid": secrets.token_hex(8)},
        "hostname": name,
        "labels": {"app": name},
        "annotations": {"note": "test"},
        "linux": {"cgroup_parent": cgroup_parent, "security_context": {"namespace_options": ns}},
    }
    config.update(extra)
    return config


def container_config(name: str = "c", *, command: list[str] | None = None, args: list[str] | None = None,
                     sc: dict[str, Any] | None = None, resources: dict[str, Any] | None = None,
                     **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"metadata": {"name": name}, "image": {"image": "busybox:test"},
                              "log_path": f"{name}.log", "labels": {"c": name}}
    if command is not None:
        config["command"] = command
    if args is not None:
        config["args"] = args
    linux: dict[str, Any] = {}
    if sc is not None:
        linux["security_context"] = sc
    if resources is not None:
        linux["resources"] = resources
    if linux:
        config["linux"] = linux
    config.update(extra)
    return config


IMAGE = {"id": "sha256:" + "ab" * 32, "repo_tags": ["busybox:test"], "repo_digests": [],
         "config": {"user": "", "env": ["PATH=/bin", "FROM_IMAGE=1"], "entrypoint": [], "cmd": ["sh"],
                    "working_dir": "", "stop_signal": None}}


async def new_pod(rt: Runtimed, cgroup_parent: str, **kw: Any) -> str:
    reserved = await rt.reserve_sandbox(config=pod_config(cgroup_parent, **kw))
    await rt.create_sandbox(sandbox_id=reserved["id"])
    return reserved["id"]


async def new_container(rt: Runtimed, pod: str, rootfs: str, config: dict[str, Any],
                        image: dict[str, Any] | None = None, start: bool = True) -> str:
    reserved = await rt.reserve_container(sandbox_id=pod, config=config)
    await rt.create_container(container_id=reserved["id"], rootfs=rootfs, image=image or IMAGE)
    if start:
        await rt.start_container(container_id=reserved["id"])
    return reserved["id"]


async def wait_exited(rt: Runtimed, cid: str, timeout: float = 20.0) -> dict[str, Any]:
    import asyncio
    import time
    deadline = time.monotonic() + timeout
    while True:
        status = (await rt.container_status(container_id=cid))["status"]
        if status["state"] == "CONTAINER_EXITED" or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


async def run_to_exit(rt: Runtimed, pod: str, rootfs: str, config: dict[str, Any],
                      image: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Run a container to its end; its final status and its log."""
    cid = await new_container(rt, pod, rootfs, config, image)
    status = await wait_exited(rt, cid)
    assert status["state"] == "CONTAINER_EXITED", status
    return status, read_log(status["log_path"])


def read_log(path: str) -> str:
    """The messages of a CRI log file, joined (partial lines merged)."""
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 4:
            continue
        out.append(parts[3] + ("\n" if parts[2] == "F" else ""))
    return "".join(out)
