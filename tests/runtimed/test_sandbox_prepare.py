"""A pod made in two calls: `prepare_sandbox` (no network needed) while netd attaches it, then `create_sandbox`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from services.runtimed.service import Runtimed
from shared import mountinfo
from shared.errors import InvalidArgument
from tests.runtimed.conftest import container_config, new_container, pod_config, read_log, wait_exited

pytestmark = pytest.mark.root


def left_by_pods(rt: Runtimed, base: Path, cgroup_parent: str) -> dict[str, list[str]]:
    """Mounts, pod directories and cgroups the pods of this runtimed left; all empty when none."""
    from services.runtimed import cgroups
    sandboxes = [os.path.join(rt.ctx.state_dir, "sandboxes"), os.path.join(rt.ctx.run_dir, "sandboxes")]
    return {
        "mounts": [m.mount_point for m in mountinfo.current() if m.mount_point.startswith(str(base) + "/")
                   and "/netns-" not in m.mount_point],
        "dirs": [os.path.join(d, n) for d in sandboxes for n in os.listdir(d)],
        "cgroups": [d for d in cgroups.controller_dirs(cgroup_parent) if os.path.isdir(d)],
    }


@pytest.fixture
def netns(base_dir: Path):
    """A network namespace pinned on a file, as netd makes them."""
    path = base_dir / "netns-pod"
    path.touch()
    subprocess.run(["unshare", f"--net={path}", "true"], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def in_namespaces(rec: dict, *command: str) -> str:
    """Run `command` in the pod's pinned namespaces (and network namespace, when it has one)."""
    flags = [f"--ipc={rec['ipc_ns_path']}", f"--uts={rec['uts_ns_path']}"]
    if rec.get("netns_path"):
        flags.append(f"--net={rec['netns_path']}")
    return subprocess.run(["nsenter", *flags, *command], check=True, capture_output=True, text=True).stdout


async def test_prepared_then_created(runtimed, cgroup_parent, rootfs, netns):
    config = pod_config(cgroup_parent, name="twostep", linux={
        "cgroup_parent": f"{cgroup_parent}/twostep",
        "sysctls": {"kernel.shm_rmid_forced": "1", "net.ipv4.ip_unprivileged_port_start": "77"}})
    pod = (await runtimed.reserve_sandbox(config=config))["id"]
    assert (await runtimed.prepare_sandbox(sandbox_id=pod))["state"] == "reserved"
    rec = runtimed.sandboxes[pod]
    # Made now: the namespaces with the hostname and IPC sysctls, shm, files; not listed yet.
    assert in_namespaces(rec, "sh", "-c", "hostname; cat /proc/sys/kernel/shm_rmid_forced").split() == ["twostep", "1"]
    assert mountinfo.is_mount_point(rec["shm_path"])
    assert os.path.exists(rec["resolv_path"]) and not os.path.exists(rec["hosts_path"])
    assert await runtimed.list_sandboxes() == []
    # Asked again (a retry), nothing is made twice.
    ipc_inode = os.stat(rec["ipc_ns_path"]).st_ino
    await runtimed.prepare_sandbox(sandbox_id=pod)
    assert os.stat(rec["ipc_ns_path"]).st_ino == ipc_inode

    await runtimed.create_sandbox(sandbox_id=pod, netns_path=netns, ips=["10.1.2.3"])
    assert "10.1.2.3\ttwostep" in Path(rec["hosts_path"]).read_text()
    assert in_namespaces(rec, "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start").strip() == "77"
    cid = await new_container(runtimed, pod, rootfs, container_config(command=["hostname"]))
    assert read_log((await wait_exited(runtimed, cid))["log_path"]) == "twostep\n"


async def test_a_released_preparation_leaves_nothing(runtimed, cgroup_parent, base_dir):
    before = left_by_pods(runtimed, base_dir, f"{cgroup_parent}/gone")
    pod = (await runtimed.reserve_sandbox(config=pod_config(
        cgroup_parent, name="gone", linux={"cgroup_parent": f"{cgroup_parent}/gone"})))["id"]
    await runtimed.prepare_sandbox(sandbox_id=pod)
    assert left_by_pods(runtimed, base_dir, f"{cgroup_parent}/gone") != before
    await runtimed.release_sandbox(sandbox_id=pod)
    assert pod not in runtimed.sandboxes
    assert left_by_pods(runtimed, base_dir, f"{cgroup_parent}/gone") == before


async def test_a_failed_preparation_undoes_itself_and_keeps_the_reservation(runtimed, cgroup_parent, base_dir):
    before = left_by_pods(runtimed, base_dir, f"{cgroup_parent}/bad")
    # Accepted by the checks, refused by the kernel when written (after the namespaces are made).
    config = pod_config(cgroup_parent, name="bad", linux={"cgroup_parent": f"{cgroup_parent}/bad",
                                                          "sysctls": {"kernel.shmmni": "not-a-number"}})
    pod = (await runtimed.reserve_sandbox(config=config))["id"]
    with pytest.raises(InvalidArgument, match="kernel.shmmni"):
        await runtimed.prepare_sandbox(sandbox_id=pod)
    assert runtimed.sandboxes[pod]["state"] == "reserved"
    assert left_by_pods(runtimed, base_dir, f"{cgroup_parent}/bad") == before
    await runtimed.release_sandbox(sandbox_id=pod)
    assert left_by_pods(runtimed, base_dir, f"{cgroup_parent}/bad") == before


async def test_a_failed_creation_undoes_the_preparation(runtimed, cgroup_parent, base_dir, netns):
    before = left_by_pods(runtimed, base_dir, f"{cgroup_parent}/late")
    # A net sysctl the kernel refuses: it fails in create_sandbox, after the preparation.
    config = pod_config(cgroup_parent, name="late", linux={"cgroup_parent": f"{cgroup_parent}/late",
                                                           "sysctls": {"net.ipv4.ip_unprivileged_port_start": "x"}})
    pod = (await runtimed.reserve_sandbox(config=config))["id"]
    await runtimed.prepare_sandbox(sandbox_id=pod)
    with pytest.raises(InvalidArgument, match="ip_unprivileged_port_start"):
        await runtimed.create_sandbox(sandbox_id=pod, netns_path=netns, ips=[])
    assert runtimed.sandboxes[pod]["state"] == "reserved"
    assert left_by_pods(runtimed, base_dir, f"{cgroup_parent}/late") == before
    # The retry makes it whole again.
    runtimed.sandboxes[pod]["config"]["linux"]["sysctls"] = {"net.ipv4.ip_unprivileged_port_start": "80"}
    await runtimed.prepare_sandbox(sandbox_id=pod)
    await runtimed.create_sandbox(sandbox_id=pod, netns_path=netns, ips=[])
    assert (await runtimed.sandbox_status(sandbox_id=pod))["status"]["state"] == "SANDBOX_READY"


async def test_pods_started_together_all_get_the_infra_root_file_system(runtimed: Runtimed):
    """The first pods after a start race to copy catatonit into the infra root: none of them fails."""
    import asyncio

    from services.runtimed import infra
    roots = await asyncio.gather(*(asyncio.to_thread(infra._rootfs, runtimed.ctx) for _ in range(16)))
    assert set(roots) == {os.path.join(runtimed.ctx.state_dir, "infra-rootfs")}
    assert sorted(os.listdir(roots[0])) == ["catatonit", "dev", "proc", "sys"]
    assert os.access(os.path.join(roots[0], "catatonit"), os.X_OK)
