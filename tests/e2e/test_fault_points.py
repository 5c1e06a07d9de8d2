"""A kill at every step: a service SIGKILLed at a named point of a pod's life, and the kubelet's retries.

Each case arms one fault point (shared/faults.py) and drives a pod through
RunPodSandbox, CreateContainer, StartContainer, StopPodSandbox and
RemovePodSandbox as the kubelet does: a call that fails is retried, the same
request again, until it succeeds. The point must have been reached (the
service died there and the supervisor started it again); every call must
succeed within a few retries; the pod and its container must be listed once,
ready and running; and once the pod is removed nothing may be left: mounts,
network namespaces, veths, IP leases, cgroups, conmon, runc containers, or
the daemons' records.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from shared import faults
from tests.support.pods import bridge_stack, busybox_registry, leftovers, new_leftovers
from tests.support.stack import Stack, short_tempdir

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

CGROUP_PARENT = f"/criopy-faults-{secrets.token_hex(3)}"
CALL_TIMEOUT = 10.0
# The kubelet retries a failed call; a service killed once must be back well within these.
MAX_ATTEMPTS = 8
MAX_SECONDS = 60.0

POINTS = [
    # The frontend, after each bus step of each CRI call.
    "frontend.after.runtimed.reserve_sandbox",
    "frontend.after.netd.attach",
    "frontend.after.runtimed.prepare_sandbox",
    "frontend.after.runtimed.create_sandbox",
    "frontend.after.runtimed.reserve_container",
    "frontend.after.imaged.image_status",
    "frontend.after.storaged.create_rootfs",
    "frontend.after.runtimed.create_container",
    "frontend.after.runtimed.start_container",
    "frontend.after.runtimed.stop_sandbox",
    "frontend.after.netd.detach",
    "frontend.after.runtimed.list_containers",
    "frontend.after.runtimed.remove_container",
    "frontend.after.storaged.remove_rootfs",
    "frontend.after.runtimed.remove_sandbox",
    # netd: the pod network.
    "netd.attach.after_netns",
    "netd.attach.after_cni_add",
    "netd.detach.after_cni_del",
    # runtimed: the pod and its container.
    "runtimed.create_sandbox.after_record",
    "runtimed.create_sandbox.after_namespaces",
    "runtimed.create_sandbox.after_infra",
    "runtimed.create_container.after_conmon",
    "runtimed.start_container.after_runc_start",
    "runtimed.stop_sandbox.after_containers",
    "runtimed.remove_container.after_runc_delete",
    "runtimed.remove_sandbox.after_containers",
    "runtimed.remove_sandbox.after_teardown",
    # storaged: the container's root file system.
    "storaged.create_rootfs.after_mount",
    "storaged.remove_rootfs.after_unmount",
]


class World:
    def __init__(self, stack: Stack, image: str, fault_dir: Path) -> None:
        self.stack = stack
        self.image = image
        self.fault_dir = fault_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # The frontend runs as criopy-frontend and removes the file of a point it reaches.
    fault_dir = short_tempdir("faults-")
    fault_dir.chmod(0o777)
    try:
        with busybox_registry(tmp_path_factory.mktemp("faults-registry"), "faults/busybox",
                              cmd=["sh"], env=["PATH=/bin"]) as (registry, image), \
                bridge_stack("cpf-", CGROUP_PARENT, "--set", "criopy.supervisor.restart_backoff_max=0.5",
                             registry=registry, env={faults.ENV: str(fault_dir)}) as stack:
            stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
            yield World(stack, image, fault_dir)
    finally:
        shutil.rmtree(fault_dir, ignore_errors=True)


class Kubelet:
    """Calls retried as the kubelet retries them: the same request, until it succeeds."""

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()

    def __call__(self, what: str, call: Callable[[], Any]) -> Any:
        started = time.monotonic()
        for _attempt in range(MAX_ATTEMPTS):
            try:
                return call()
            except grpc.RpcError as e:
                self.failures[f"{what}: {e.code().name}"] += 1
                last = f"{e.code().name}: {e.details()}"
            if time.monotonic() - started > MAX_SECONDS:
                break
            time.sleep(0.5)
        raise AssertionError(f"{what} did not succeed within {MAX_ATTEMPTS} tries: {last}; {dict(self.failures)}")


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_each_point_converges_and_leaks_nothing(world: World, point: str) -> None:
    stack, rt = world.stack, world.stack.runtime
    stack.wait_ready(timeout=60)
    before = leftovers(stack, CGROUP_PARENT)
    kubelet = Kubelet()
    name = f"f{secrets.token_hex(3)}"
    pod = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="faults", uid=secrets.token_hex(8)),
        hostname=name, linux=api_pb2.LinuxPodSandboxConfig(
            cgroup_parent=f"{CGROUP_PARENT}/{name}",
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NamespaceMode.POD))))
    container = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="c"), image=api_pb2.ImageSpec(image=world.image),
        command=["sleep", "600"], log_path="c.log")
    armed = world.fault_dir / point
    armed.touch()
    try:
        pod_id = kubelet("RunPodSandbox", lambda: rt.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=pod), timeout=CALL_TIMEOUT).pod_sandbox_id)
        cid = kubelet("CreateContainer", lambda: rt.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=container, sandbox_config=pod), timeout=CALL_TIMEOUT).container_id)
        kubelet("StartContainer", lambda: rt.StartContainer(
            api_pb2.StartContainerRequest(container_id=cid), timeout=CALL_TIMEOUT))

        pods = [p for p in kubelet("ListPodSandbox", lambda: rt.ListPodSandbox(
            api_pb2.ListPodSandboxRequest(), timeout=CALL_TIMEOUT)).items if p.metadata.name == name]
        assert [(p.id, p.state) for p in pods] == [(pod_id, api_pb2.PodSandboxState.SANDBOX_READY)]
        containers = kubelet("ListContainers", lambda: rt.ListContainers(api_pb2.ListContainersRequest(
            filter=api_pb2.ContainerFilter(pod_sandbox_id=pod_id)), timeout=CALL_TIMEOUT)).containers
        assert [(c.id, c.state) for c in containers] == [(cid, api_pb2.ContainerState.CONTAINER_RUNNING)]
        reply = kubelet("ExecSync", lambda: rt.ExecSync(api_pb2.ExecSyncRequest(
            container_id=cid, cmd=["echo", "alive"], timeout=5), timeout=CALL_TIMEOUT))
        assert reply.stdout == b"alive\n"

        kubelet("StopPodSandbox", lambda: rt.StopPodSandbox(
            api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT))
        kubelet("RemovePodSandbox", lambda: rt.RemovePodSandbox(
            api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT))
    finally:
        reached = not armed.exists()
        armed.unlink(missing_ok=True)
    assert reached, f"the fault point {point} was never reached"
    assert [p.id for p in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=CALL_TIMEOUT).items
            if p.metadata.name == name] == []
    assert new_leftovers(stack, CGROUP_PARENT, before) == {}
