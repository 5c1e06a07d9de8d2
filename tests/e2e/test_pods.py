"""Pods and containers through the real CRI socket: images from docker-registry, bridge CNI, runc+conmon."""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from shared import mountinfo, privileges
from shared.config import DEFAULT_CAPABILITIES
from tests.support.pods import bridge_stack, busybox_registry, conmon_pids, leftover_mounts, runc_ids
from tests.support.registry import Registry
from tests.support.stack import Stack

pytestmark = pytest.mark.root

CGROUP_PARENT = f"/criopy-e2e-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def registry_and_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, str]]:
    with busybox_registry(tmp_path_factory.mktemp("pods-registry"), "pods/busybox",
                          cmd=["sh"], env=["PATH=/bin", "FROM=image"]) as found:
        yield found


@pytest.fixture(scope="module")
def registry(registry_and_image: tuple[Registry, str]) -> Registry:
    return registry_and_image[0]


@pytest.fixture(scope="module")
def busybox(registry_and_image: tuple[Registry, str]) -> str:
    return registry_and_image[1]


@pytest.fixture
def pod_stack(registry: Registry) -> Iterator[Stack]:
    with bridge_stack("cpp-", CGROUP_PARENT, registry=registry) as stack:
        yield stack


def pod_config(name: str, *, attempt: int = 0, uid: str | None = None) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="e2e", uid=uid or secrets.token_hex(8), attempt=attempt),
        hostname=name, labels={"app": name},
        linux=api_pb2.LinuxPodSandboxConfig(
            cgroup_parent=f"{CGROUP_PARENT}/{name}",
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NamespaceMode.CONTAINER))))


def container_config(name: str, image: str, command: list[str]) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name), image=api_pb2.ImageSpec(image=image),
        command=command, log_path=f"{name}.log", labels={"c": name},
        envs=[api_pb2.KeyValue(key="GREETING", value="hello")])


def run_pod(stack: Stack, config: api_pb2.PodSandboxConfig) -> str:
    return stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id


def create(stack: Stack, pod_id: str, pod: api_pb2.PodSandboxConfig, config: api_pb2.ContainerConfig) -> str:
    return stack.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod), timeout=60).container_id


def wait_state(stack: Stack, cid: str, state: int, timeout: float = 20) -> api_pb2.ContainerStatus:
    deadline = time.time() + timeout
    while True:
        status = stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status
        if status.state == state or time.time() > deadline:
            return status
        time.sleep(0.05)


def test_pod_and_container_lifecycle(pod_stack: Stack, busybox: str):
    stack = pod_stack
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=60)
    pod = pod_config("web")
    pod_id = run_pod(stack, pod)
    status = stack.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=10).status
    assert status.state == api_pb2.PodSandboxState.SANDBOX_READY
    assert status.network.ip
    assert status.labels["app"] == "web"
    cid = create(stack, pod_id, pod, container_config("main", busybox, ["sh", "-c", "echo $GREETING $FROM; sleep 600"]))
    st = stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status
    assert st.state == api_pb2.ContainerState.CONTAINER_CREATED
    assert st.image.image == busybox and st.image_ref
    stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    assert wait_state(stack, cid, api_pb2.ContainerState.CONTAINER_RUNNING).state == api_pb2.ContainerState.CONTAINER_RUNNING
    result = stack.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "ip -4 addr show eth0; exit 2"],
                                                            timeout=10), timeout=30)
    assert result.exit_code == 2 and status.network.ip.encode() in result.stdout
    # Under the real runtimed process: CRI-O's default capabilities, nothing more.
    result = stack.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["grep", "CapEff", "/proc/1/status"],
                                                            timeout=10), timeout=30)
    effective = privileges.names_from_mask(int(result.stdout.split()[1], 16))
    assert effective == {f"CAP_{c}" for c in DEFAULT_CAPABILITIES}
    # Filters: state CREATED is the enum's zero value and must still filter.
    listed = stack.runtime.ListContainers(api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(
        state=api_pb2.ContainerStateValue(state=api_pb2.ContainerState.CONTAINER_CREATED))), timeout=10).containers
    assert listed == []
    listed = stack.runtime.ListContainers(api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(
        pod_sandbox_id=pod_id, label_selector={"c": "main"})), timeout=10).containers
    assert [c.id for c in listed] == [cid]
    stack.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=1), timeout=30)
    st = wait_state(stack, cid, api_pb2.ContainerState.CONTAINER_EXITED)
    assert st.state == api_pb2.ContainerState.CONTAINER_EXITED and st.exit_code == 137
    log = Path(st.log_path).read_text()
    assert " stdout F hello image\n" in log
    stack.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    stack.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    stack.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=30)
    stack.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=30)
    stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=30)
    stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=30)
    assert stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items == []
    with pytest.raises(grpc.RpcError) as err:
        stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert conmon_pids(stack.dirs.base) == []
    assert leftover_mounts(stack) == []


def test_missing_image_and_bad_input(pod_stack: Stack, busybox: str):
    stack = pod_stack
    pod = pod_config("bad")
    pod_id = run_pod(stack, pod)
    with pytest.raises(grpc.RpcError) as err:
        create(stack, pod_id, pod, container_config("x", "127.0.0.1:1/not/pulled:latest", ["true"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "not/pulled" in err.value.details()
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=60)
    bad_log = container_config("y", busybox, ["true"])
    bad_log.log_path = "../../../escape.log"
    with pytest.raises(grpc.RpcError) as err:
        create(stack, pod_id, pod, bad_log)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stack.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers == []
    rootfs_dir = stack.dirs.root / "storaged"
    assert not any(m.mount_point.startswith(str(rootfs_dir)) for m in mountinfo.current())
    with pytest.raises(grpc.RpcError) as err:
        stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_config("h"), runtime_handler="nope"),
                                    timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A host-network pod: no netns, the host's hostname; stop and remove work all the same.
    host = pod_config("hostnet")
    host.linux.security_context.namespace_options.network = api_pb2.NamespaceMode.NODE
    host_id = run_pod(stack, host)
    cid = create(stack, host_id, host, container_config("h", busybox, ["hostname"]))
    stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    st = wait_state(stack, cid, api_pb2.ContainerState.CONTAINER_EXITED)
    assert Path(st.log_path).read_text().split()[-1] == os.uname().nodename
    stack.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=host_id), timeout=30)
    stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=host_id), timeout=30)
    assert [p.id for p in stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items] == [pod_id]


def test_retried_run_pod_sandbox_returns_the_same_pod(pod_stack: Stack):
    stack = pod_stack
    config = pod_config("retry")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: run_pod(stack, config), range(4)))
    assert len(set(ids)) == 1
    different = pod_config("retry", uid=config.metadata.uid)
    different.labels["other"] = "yes"
    with pytest.raises(grpc.RpcError) as err:
        run_pod(stack, different)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_runtimed_sigkill_during_pod_churn(pod_stack: Stack, busybox: str):
    stack = pod_stack
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=60)
    stop = False
    kills = 0

    def killer() -> None:
        nonlocal kills
        while not stop and kills < 3:
            time.sleep(0.7 + secrets.randbelow(700) / 1000)
            try:
                os.kill(stack.pid("runtimed"), signal.SIGKILL)
                kills += 1
            except (AssertionError, ProcessLookupError):
                pass

    def churn(n: int) -> None:
        pod = pod_config(f"churn{n}")
        try:
            pod_id = stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=15).pod_sandbox_id
            cid = stack.runtime.CreateContainer(api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=container_config("c", busybox, ["sleep", "600"]), sandbox_config=pod),
                timeout=15).container_id
            stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=5)
            if n % 2:
                stack.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=15)
                stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=15)
        except grpc.RpcError:
            pass  # a call cut by the kill; what it left is checked below

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        killing = pool.submit(killer)
        for n in range(14):
            churn(n)
        stop = True
        killing.result()
    assert kills >= 1
    stack.wait_ready()
    # Every container runc knows is one runtimed knows.
    listed = {c.id for c in stack.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=30).containers}
    pods = stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items
    assert runc_ids(stack) <= listed | {p.id for p in pods}
    for cid in listed:
        st = stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status
        assert st.state in (api_pb2.ContainerState.CONTAINER_CREATED, api_pb2.ContainerState.CONTAINER_RUNNING,
                            api_pb2.ContainerState.CONTAINER_EXITED)
    for pod in pods:
        stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
    assert stack.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=30).containers == []
    assert runc_ids(stack) == set()
    assert conmon_pids(stack.dirs.base) == []
    assert leftover_mounts(stack) == []
    cgroup_dirs = [p for top in Path("/sys/fs/cgroup").glob(f"*{CGROUP_PARENT}") for p in top.rglob("*") if p.is_dir()]
    assert cgroup_dirs == []


def test_container_features_through_cri(pod_stack: Stack, busybox: str):
    stack = pod_stack
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=60)
    pod = pod_config("features")
    pod.linux.security_context.namespace_options.pid = api_pb2.NamespaceMode.POD
    pod_id = run_pod(stack, pod)

    def start(name: str, command: list[str], **linux_kw) -> str:
        config = container_config(name, busybox, command)
        config.linux.CopyFrom(api_pb2.LinuxContainerConfig(**linux_kw))
        cid = create(stack, pod_id, pod, config)
        stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
        return cid

    shared = api_pb2.LinuxContainerSecurityContext(namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NamespaceMode.POD))
    first = start("first", ["sleep", "4321"], security_context=shared)
    second = start("second", ["sh", "-c", "while true; do echo tick; sleep 0.1; done"], security_context=shared)
    out = stack.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=second, cmd=["ps", "-o", "args"], timeout=10),
                                 timeout=30).stdout.decode()
    assert "sleep 4321" in out and "catatonit" in out
    # Log rotation: the kubelet renames the file, conmon reopens it.
    st = stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=second), timeout=10).status
    time.sleep(0.3)
    os.rename(st.log_path, st.log_path + ".1")
    stack.runtime.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=second), timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and " stdout F tick" not in Path(st.log_path).read_text():
        time.sleep(0.1)
    assert " stdout F tick" in Path(st.log_path).read_text()
    # Limits: set, changed live, enforced.
    hog = start("hog", ["sh", "-c", "x=AAAAAAAAAAAAAAAA; while true; do x=$x$x; done"],
                resources=api_pb2.LinuxContainerResources(memory_limit_in_bytes=16 << 20))
    st = wait_state(stack, hog, api_pb2.ContainerState.CONTAINER_EXITED)
    assert st.reason == "OOMKilled"
    stack.runtime.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(
        container_id=first, linux=api_pb2.LinuxContainerResources(memory_limit_in_bytes=48 << 20)), timeout=30)
    memory = Path(f"/sys/fs/cgroup/memory{CGROUP_PARENT}/features/crio-{first}/memory.limit_in_bytes")
    if memory.exists():
        assert memory.read_text().strip() == str(48 << 20)
    # Security: read-only rootfs, RuntimeDefault seccomp.
    ro = start("ro", ["sh", "-c", "touch /x 2>&1; unshare -U true 2>&1; exit 0"],
               security_context=api_pb2.LinuxContainerSecurityContext(
                   readonly_rootfs=True, seccomp=api_pb2.SecurityProfile(
                       profile_type=api_pb2.SecurityProfile.ProfileType.RuntimeDefault)))
    st = wait_state(stack, ro, api_pb2.ContainerState.CONTAINER_EXITED)
    log = Path(st.log_path).read_text()
    assert "Read-only file system" in log and "Function not implemented" in log
    # Stop escalates to SIGKILL for a process that ignores SIGTERM.
    stubborn = start("stubborn", ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
    time.sleep(0.3)
    stack.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=stubborn, timeout=1), timeout=30)
    assert wait_state(stack, stubborn, api_pb2.ContainerState.CONTAINER_EXITED).exit_code == 137


def test_an_image_in_use_by_a_container_cannot_be_removed(pod_stack: Stack, busybox: str):
    stack = pod_stack
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=60)
    pod = pod_config("inuse")
    pod_id = run_pod(stack, pod)
    cid = create(stack, pod_id, pod, container_config("user", busybox, ["true"]))
    with pytest.raises(grpc.RpcError) as err:
        stack.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert cid[:12] in err.value.details() or "in use" in err.value.details()
    status = stack.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=10)
    assert status.image.id
    stack.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    stack.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=30)
    gone = stack.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=10)
    assert not gone.HasField("image")


def test_stop_and_remove_succeed_for_unknown_ids_and_accept_short_ids(pod_stack: Stack, busybox: str):
    stack = pod_stack
    unknown = secrets.token_hex(32)
    # The kubelet retries stops and removals after a restart: an id that is gone is success.
    stack.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=unknown, timeout=1), timeout=30)
    stack.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=unknown), timeout=30)
    stack.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=unknown), timeout=30)
    stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=unknown), timeout=30)
    # Status of an unknown id is still NotFound.
    with pytest.raises(grpc.RpcError) as err:
        stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=unknown), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # A unique id prefix names the object, as crictl's short ids do, for every step of the removal.
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=60)
    pod = pod_config("short")
    pod_id = run_pod(stack, pod)
    cid = create(stack, pod_id, pod, container_config("c", busybox, ["sleep", "600"]))
    stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    stack.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid[:12], timeout=0), timeout=30)
    assert wait_state(stack, cid, api_pb2.ContainerState.CONTAINER_EXITED).state == api_pb2.ContainerState.CONTAINER_EXITED
    stack.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid[:12]), timeout=30)
    assert stack.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers == []
    assert not (stack.dirs.root / "storaged" / "rootfs" / cid).exists()
    stack.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id[:12]), timeout=30)
    stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id[:12]), timeout=30)
    assert stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items == []
    assert not list((stack.dirs.netns).iterdir())
    assert leftover_mounts(stack) == []
