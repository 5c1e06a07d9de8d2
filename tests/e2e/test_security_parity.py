"""Security and resource behaviours the kubelet relies on, through the real CRI socket.

run_as_group without a user is refused early; SupplementalGroupsPolicy Merge and
Strict; recursive read-only mounts (and where they are refused); procMount
Unmasked; hugepage limits on a machine whose hugetlb controller is not usable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.e2e.test_pods import container_config, create, pod_config, run_pod, wait_state
from tests.support import images
from tests.support.pods import bridge_stack, remove_pods, runc_ids
from tests.support.registry import Registry, launch_registry
from tests.support.stack import Stack, short_tempdir

pytestmark = pytest.mark.root

CGROUP_PARENT = f"/criopy-sec-{os.getpid()}"
RUNNING = api_pb2.ContainerState.CONTAINER_RUNNING

# What the kubelet sends for procMount Default (pkg/securitycontext); for Unmasked it sends empty lists.
KUBELET_MASKED_PATHS = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                        "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                        "/sys/firmware", "/sys/devices/virtual/powercap"]
KUBELET_READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def old_runc(workdir: Path) -> str:
    """A runtime that says it is runc 1.0.3 (too old for `rro`) and hands every real call to runc."""
    path = workdir / "old-runc"
    path.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "runc version 1.0.3"; exit 0; fi\n'
                    'exec /usr/bin/runc "$@"\n')
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def registry(workdir: Path) -> Iterator[tuple[Registry, str, str]]:
    """A registry with busybox, and an image whose user `app` is a member of groups 50000 and 50001."""
    reg = launch_registry(workdir / "registry")
    try:
        busybox = images.push_busybox_image(reg, "sec/busybox", "latest", cmd=["sh"]).ref
        groups = images.push_user_image(reg, "sec/groups", "latest",
                                        extra_groups={"audio": 50000, "video": 50001}).ref
        yield reg, busybox, groups
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def sec_stack(registry: tuple[Registry, str, str], old_runc: str) -> Iterator[Stack]:
    reg, busybox, groups = registry
    with bridge_stack("cps-", CGROUP_PARENT, "--set", f"crio.runtime.runtimes.old.runtime_path={old_runc}",
                      registry=reg) as stack:
        for ref in (busybox, groups):
            stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=60)
        yield stack


@pytest.fixture(autouse=True)
def no_pods_left(sec_stack: Stack) -> Iterator[None]:
    yield
    remove_pods(sec_stack)


@pytest.fixture
def busybox(registry: tuple[Registry, str, str]) -> str:
    return registry[1]


def new_pod(name: str) -> api_pb2.PodSandboxConfig:
    pod = pod_config(name)
    pod.linux.cgroup_parent = f"{CGROUP_PARENT}/{name}"
    return pod


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def started(stack: Stack, pod_id: str, pod: api_pb2.PodSandboxConfig, config: api_pb2.ContainerConfig) -> str:
    cid = create(stack, pod_id, pod, config)
    stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    assert wait_state(stack, cid, RUNNING).state == RUNNING
    return cid


def run(stack: Stack, cid: str, *cmd: str) -> api_pb2.ExecSyncResponse:
    return stack.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=10), timeout=30)


def status_line(text: bytes, key: str) -> list[int]:
    """The numbers of a line of /proc/<pid>/status, e.g. Groups."""
    for line in text.decode().splitlines():
        if line.startswith(key + ":"):
            return [int(v) for v in line.split(":", 1)[1].split()]
    raise AssertionError(f"no {key} line in {text!r}")


# -- run_as_group without a user ----------------------------------------------------------------------


def test_run_as_group_without_a_user_is_refused_before_anything_is_made(sec_stack: Stack, busybox: str):
    stack = sec_stack
    pod = new_pod("rungroup")
    pod.linux.security_context.run_as_group.value = 3000
    err = refused(lambda: run_pod(stack, pod))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "run_as_group" in err.details() and "run_as_user" in err.details()
    assert stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items == []
    assert os.listdir(stack.dirs.netns) == []
    # Nothing holds the pod's name: the same pod with a user is made.
    pod.linux.security_context.run_as_user.value = 1000
    pod_id = run_pod(stack, pod)

    config = container_config("c", busybox, ["sleep", "600"])
    config.linux.security_context.run_as_group.value = 3000
    err = refused(lambda: create(stack, pod_id, pod, config))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "linux.security_context.run_as_group" in err.details() and "run_as_user" in err.details()
    assert stack.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers == []
    assert runc_ids(stack) == set()
    assert os.listdir(stack.dirs.root / "storaged" / "rootfs") == []
    # A user name is enough, and the name of the refused container is free.
    config.linux.security_context.run_as_username = "nobody"
    cid = started(stack, pod_id, pod, config)
    proc = run(stack, cid, "cat", "/proc/1/status")
    assert status_line(proc.stdout, "Uid")[0] == 65534 and status_line(proc.stdout, "Gid")[0] == 3000


# -- SupplementalGroupsPolicy --------------------------------------------------------------------------


@pytest.mark.parametrize("policy, expected", [
    (api_pb2.SupplementalGroupsPolicy.Merge, {3000, 4000, 50000, 50001}),
    (api_pb2.SupplementalGroupsPolicy.Strict, {3000, 4000}),
])
def test_supplemental_groups_policy(sec_stack: Stack, registry: tuple[Registry, str, str],
                                    policy: int, expected: set[int]):
    stack = sec_stack
    assert stack.runtime.Status(api_pb2.StatusRequest(), timeout=10).features.supplemental_groups_policy
    pod = new_pod("groups")
    pod_id = run_pod(stack, pod)
    config = container_config("c", registry[2], ["sleep", "600"])
    sc = config.linux.security_context
    sc.run_as_user.value = 1000
    sc.run_as_group.value = 3000
    sc.supplemental_groups.append(4000)
    sc.supplemental_groups_policy = policy
    cid = started(stack, pod_id, pod, config)
    init = run(stack, cid, "cat", "/proc/1/status").stdout
    assert status_line(init, "Uid")[0] == 1000 and status_line(init, "Gid")[0] == 3000
    assert set(status_line(init, "Groups")) == expected
    assert {int(g) for g in run(stack, cid, "id", "-G").stdout.split()} == expected
    user = stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status.user
    assert (user.linux.uid, user.linux.gid) == (1000, 3000)
    assert set(user.linux.supplemental_groups) == expected


# -- recursive read-only mounts ------------------------------------------------------------------------


def _rro_expected() -> bool:
    """runc 1.1 or later and Linux 5.12 or later, found out here without crio-py's code."""
    words = subprocess.run(["runc", "--version"], capture_output=True, text=True, check=True).stdout.split()
    runc = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", words[2]).groups())  # type: ignore[union-attr]
    kernel = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())  # type: ignore[union-attr]
    return runc >= (1, 1) and kernel >= (5, 12)


@pytest.fixture
def volume_with_submount() -> Iterator[Path]:
    """A host directory with a tmpfs mounted inside it, at sub/."""
    vol = short_tempdir("rro-")
    (vol / "sub").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "rro-test", str(vol / "sub")], check=True)
    try:
        yield vol
    finally:
        subprocess.run(["umount", "-l", str(vol / "sub")], capture_output=True)
        shutil.rmtree(vol, ignore_errors=True)


def _volume(vol: Path, *, readonly: bool = True, recursive: bool = True,
            propagation: int = api_pb2.MountPropagation.PROPAGATION_PRIVATE) -> api_pb2.Mount:
    return api_pb2.Mount(container_path="/vol", host_path=str(vol), readonly=readonly,
                         recursive_read_only=recursive, propagation=propagation)


def test_status_reports_recursive_read_only_per_runtime_handler(sec_stack: Stack):
    handlers = {h.name: h.features for h in
                sec_stack.runtime.Status(api_pb2.StatusRequest(), timeout=10).runtime_handlers}
    assert set(handlers) == {"", "runc", "old"}
    assert handlers["runc"].recursive_read_only_mounts is _rro_expected()
    assert handlers[""] == handlers["runc"]
    assert handlers["old"].recursive_read_only_mounts is False
    assert not any(f.user_namespaces for f in handlers.values())


def test_recursive_read_only_mount_covers_submounts(sec_stack: Stack, busybox: str, volume_with_submount: Path):
    if not _rro_expected():
        pytest.skip("this machine's runc or kernel cannot make recursive read-only mounts")
    stack, vol = sec_stack, volume_with_submount
    pod = new_pod("rro")
    pod_id = run_pod(stack, pod)
    rro_config = container_config("rro", busybox, ["sleep", "600"])
    rro_config.mounts.append(_volume(vol))
    rro = started(stack, pod_id, pod, rro_config)
    ro_config = container_config("ro", busybox, ["sleep", "600"])
    ro_config.mounts.append(_volume(vol, recursive=False))
    ro = started(stack, pod_id, pod, ro_config)

    for cid in (rro, ro):  # the top of the volume is read-only either way
        top = run(stack, cid, "touch", "/vol/top")
        assert top.exit_code != 0 and b"Read-only file system" in top.stderr
    inside = run(stack, rro, "touch", "/vol/sub/from-rro")
    assert inside.exit_code != 0 and b"Read-only file system" in inside.stderr
    inside = run(stack, ro, "touch", "/vol/sub/from-ro")
    assert inside.exit_code == 0, inside.stderr
    assert sorted(os.listdir(vol / "sub")) == ["from-ro"]
    [mount] = stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=rro),
                                            timeout=10).status.mounts
    assert mount.readonly and mount.recursive_read_only


def test_recursive_read_only_mount_refusals(sec_stack: Stack, busybox: str, volume_with_submount: Path):
    stack, vol = sec_stack, volume_with_submount
    pod = new_pod("rrono")
    pod_id = run_pod(stack, pod)
    for mount, words in ((_volume(vol, readonly=False), "needs readonly"),
                         (_volume(vol, propagation=api_pb2.MountPropagation.PROPAGATION_HOST_TO_CONTAINER),
                          "PROPAGATION_PRIVATE")):
        config = container_config("c", busybox, ["sleep", "600"])
        config.mounts.append(mount)
        err = refused(lambda: create(stack, pod_id, pod, config))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details()
    # A runtime handler whose runc is too old refuses it, and runs containers otherwise.
    old_pod = new_pod("oldrunc")
    old_pod_id = stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(
        config=old_pod, runtime_handler="old"), timeout=60).pod_sandbox_id
    config = container_config("c", busybox, ["sleep", "600"])
    config.mounts.append(_volume(vol))
    err = refused(lambda: create(stack, old_pod_id, old_pod, config))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "recursive read-only" in err.details() and "1.0.3" in err.details()
    assert stack.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers == []
    del config.mounts[:]
    cid = started(stack, old_pod_id, old_pod, config)
    assert run(stack, cid, "true").exit_code == 0


# -- procMount -----------------------------------------------------------------------------------------


def test_proc_mount_unmasked_takes_the_lists_as_given(sec_stack: Stack, busybox: str):
    stack = sec_stack
    pod = new_pod("procmount")
    pod_id = run_pod(stack, pod)
    default = container_config("default", busybox, ["sleep", "600"])
    default.linux.security_context.masked_paths.extend(KUBELET_MASKED_PATHS)
    default.linux.security_context.readonly_paths.extend(KUBELET_READONLY_PATHS)
    unmasked = container_config("unmasked", busybox, ["sleep", "600"])
    # What the kubelet sends for procMount Unmasked: empty lists.
    unmasked.linux.security_context.masked_paths[:] = []
    unmasked.linux.security_context.readonly_paths[:] = []
    # A masked file is /dev/null bound over it; /proc/kcore is among them where the kernel has one.
    files = [p for p in KUBELET_MASKED_PATHS if p.startswith("/proc/") and os.path.isfile(p)]
    assert files, "this kernel has none of the masked /proc files"
    probe = (f"for p in {' '.join(files)}; do if [ -c $p ]; then echo masked; else echo visible; fi; done; "
             "grep -c ' /proc/sys ' /proc/self/mountinfo; true")
    seen = {}
    for config in (default, unmasked):
        cid = started(stack, pod_id, pod, config)
        seen[config.metadata.name] = run(stack, cid, "sh", "-c", probe).stdout.decode().split()
    assert seen["default"] == ["masked"] * len(files) + ["1"]
    assert seen["unmasked"] == ["visible"] * len(files) + ["0"]


# -- hugepages -----------------------------------------------------------------------------------------


def _hugetlb_usable() -> bool:
    """Whether a cgroup hierarchy runc uses has the hugetlb controller, found out without crio-py's code."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "hugetlb" in Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        post = line.split(" - ", 1)[1].split()
        if post[0] == "cgroup" and "hugetlb" in post[2].split(","):
            return True
    return False


def _node_hugepage_limits() -> list[api_pb2.HugepageLimit]:
    """One limit of 0 per page size the node has, as the kubelet sends for a pod that asks for none."""
    limits = []
    for entry in sorted(os.listdir("/sys/kernel/mm/hugepages")):
        kib = int(re.fullmatch(r"hugepages-(\d+)kB", entry)[1])  # type: ignore[index]
        size = f"{kib // (1 << 20)}GB" if kib >= 1 << 20 else f"{kib // 1024}MB"
        limits.append(api_pb2.HugepageLimit(page_size=size, limit=0))
    return limits


def test_hugepage_limits_do_not_break_containers(sec_stack: Stack, busybox: str):
    stack = sec_stack
    limits = _node_hugepage_limits() or [api_pb2.HugepageLimit(page_size="2MB", limit=0)]
    verbose = stack.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=10)
    info = json.loads(verbose.info["detectedFeatures"])
    assert info["hugetlb"]["usable"] is _hugetlb_usable() and info["hugetlb"]["reason"]
    pod = new_pod("huge")
    pod_id = run_pod(stack, pod)
    config = container_config("c", busybox, ["sleep", "600"])
    config.linux.resources.hugepage_limits.extend(limits)
    config.linux.resources.cpu_shares = 256
    cid = started(stack, pod_id, pod, config)
    assert run(stack, cid, "true").exit_code == 0
    stack.runtime.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(
        container_id=cid, linux=api_pb2.LinuxContainerResources(cpu_shares=512, hugepage_limits=limits)),
        timeout=30)
    assert wait_state(stack, cid, RUNNING).state == RUNNING
    container = stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid, verbose=True),
                                              timeout=10)
    resources = json.loads(container.info["info"])["runtimeSpec"]["linux"]["resources"]
    assert resources["cpu"]["shares"] == 512
    assert ("hugepageLimits" in resources) is _hugetlb_usable()
