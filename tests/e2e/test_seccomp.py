"""Seccomp through the real CRI socket: unconfined without a profile, RuntimeDefault, Localhost files."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.support.pods import bridge_stack, busybox_registry
from tests.support.stack import Stack

pytestmark = pytest.mark.root

CGROUP_PARENT = f"/criopy-seccomp-{secrets.token_hex(3)}"
PROFILE = api_pb2.SecurityProfile.ProfileType
# What each container reports: its seccomp mode, then what some system calls gave.
PROBE = ("grep Seccomp: /proc/self/status; echo hello; unshare -U true && echo unshared; "
         "chroot / true && echo chrooted; touch /tmp/swap; swapon /tmp/swap; exit 0")


@pytest.fixture(scope="module")
def stack_and_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    with busybox_registry(tmp_path_factory.mktemp("seccomp-registry"), "seccomp/busybox") as (registry, image):
        with bridge_stack("csc-", CGROUP_PARENT, registry=registry) as stack:
            stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=60)
            yield stack, image


def new_pod(stack: Stack, name: str) -> tuple[str, api_pb2.PodSandboxConfig]:
    pod = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="e2e", uid=secrets.token_hex(8)),
        hostname=name, linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=f"{CGROUP_PARENT}/{name}"))
    return stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=60).pod_sandbox_id, pod


def create(stack: Stack, image: str, pod: tuple[str, api_pb2.PodSandboxConfig], name: str, command: str,
           security: api_pb2.LinuxContainerSecurityContext) -> str:
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name), image=api_pb2.ImageSpec(image=image),
        command=["sh", "-c", command], log_path=f"{name}.log",
        linux=api_pb2.LinuxContainerConfig(security_context=security))
    return stack.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod[0], config=config, sandbox_config=pod[1]), timeout=60).container_id


def output(stack: Stack, cid: str) -> str:
    """Start the container, wait for it to exit, and return what it wrote."""
    stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    deadline = time.time() + 30
    while True:
        status = stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status
        if status.state == api_pb2.ContainerState.CONTAINER_EXITED or time.time() > deadline:
            break
        time.sleep(0.05)
    assert status.state == api_pb2.ContainerState.CONTAINER_EXITED
    # CRI log lines: "<time> <stream> <tag> <text>".
    return "\n".join(line.split(" ", 3)[3] for line in Path(status.log_path).read_text().splitlines())


def run(stack: Stack, image: str, pod: tuple[str, api_pb2.PodSandboxConfig], name: str, command: str = PROBE,
        **security: object) -> str:
    return output(stack, create(stack, image, pod, name, command, api_pb2.LinuxContainerSecurityContext(**security)))


def test_no_profile_is_unconfined_and_runtime_default_is_an_allow_list(stack_and_image: tuple[Stack, str]):
    stack, image = stack_and_image
    pod = new_pod(stack, "filters")
    admin = api_pb2.Capability(add_capabilities=["SYS_ADMIN", "SYS_CHROOT"])

    out = run(stack, image, pod, "none")
    assert "Seccomp:\t0" in out and "hello" in out and "unshared" in out

    out = run(stack, image, pod, "default", seccomp=api_pb2.SecurityProfile(profile_type=PROFILE.RuntimeDefault))
    assert "Seccomp:\t2" in out and "hello" in out
    # Not in the allow-list without CAP_SYS_ADMIN: the profile's default answer, ENOSYS.
    assert "unshared" not in out and "Function not implemented" in out
    assert "chrooted" not in out

    out = run(stack, image, pod, "default-caps", capabilities=admin,
              seccomp=api_pb2.SecurityProfile(profile_type=PROFILE.RuntimeDefault))
    # The capability-gated rules follow the capabilities the container holds.
    assert "Seccomp:\t2" in out and "unshared" in out and "chrooted" in out
    # swapon(2) is refused whatever the capabilities; the kernel itself would have let the call through.
    assert "swapon: /tmp/swap: Operation not permitted" in out

    out = run(stack, image, pod, "unconfined-caps", capabilities=admin,
              seccomp=api_pb2.SecurityProfile(profile_type=PROFILE.Unconfined))
    assert "Seccomp:\t0" in out and "chrooted" in out
    assert "swapon: /tmp/swap:" in out and "Operation not permitted" not in out

    # The deprecated profile path, as the kubelet once sent it.
    out = run(stack, image, pod, "deprecated", seccomp_profile_path="runtime/default")
    assert "Seccomp:\t2" in out and "Function not implemented" in out


def test_localhost_profiles_and_their_errors(stack_and_image: tuple[Stack, str], tmp_path: Path):
    stack, image = stack_and_image
    pod = new_pod(stack, "local")
    deny_mkdir = tmp_path / "deny-mkdir.json"
    deny_mkdir.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}))
    mkdir = "grep Seccomp: /proc/self/status; mkdir /tmp/d && echo made; echo after; exit 0"

    def localhost(path: Path) -> api_pb2.SecurityProfile:
        return api_pb2.SecurityProfile(profile_type=PROFILE.Localhost, localhost_ref=str(path))

    out = run(stack, image, pod, "denied", mkdir, seccomp=localhost(deny_mkdir))
    assert "Seccomp:\t2" in out and "Operation not permitted" in out and "made" not in out and "after" in out
    out = run(stack, image, pod, "denied-old", mkdir, seccomp_profile_path=f"localhost/{deny_mkdir}")
    assert "Operation not permitted" in out and "made" not in out

    broken = tmp_path / "broken.json"
    broken.write_text('{"defaultAction": "SCMP_ACT_ALLOW", ')
    for path, reason in ((tmp_path / "missing.json", "does not exist"), (broken, "is not valid JSON")):
        with pytest.raises(grpc.RpcError) as err:
            create(stack, image, pod, "retried", mkdir,
                   api_pb2.LinuxContainerSecurityContext(seccomp=localhost(path)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(path) in err.value.details() and reason in err.value.details()
    # Nothing is left of the failed calls: no container, and the name is free again.
    listed = stack.runtime.ListContainers(api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(pod_sandbox_id=pod[0])), timeout=10).containers
    assert "retried" not in {c.metadata.name for c in listed}
    out = run(stack, image, pod, "retried", mkdir, seccomp=localhost(deny_mkdir))
    assert "Operation not permitted" in out and "after" in out
