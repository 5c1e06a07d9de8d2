"""Torn state at start, the pod side: crio-py is stopped with a pod and its running container, every
JSON record of runtimed and netd is damaged (cut in half, as a power cut leaves a file whose pages
never reached the disk, or overwritten with garbage), and crio-py is started again.

It starts, the damaged files are in quarantine (a log line and a metric say which), and the pod is
found again: listed NOTREADY with its metadata, its container still running. The kubelet stops and
removes such a pod; once it has, nothing of it is left: mounts, network namespaces, veths, IP leases,
cgroups, conmon, runc containers.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Iterator

import pytest
from cri_api.v1 import api_pb2

from tests.e2e.test_metrics import free_port, scrape, value
from tests.e2e.test_pods import container_config, create, run_pod, wait_state
from tests.support.pods import bridge_stack, busybox_registry, leftovers
from tests.support.registry import Registry
from tests.support.stack import Stack

pytestmark = pytest.mark.root

CGROUP_PARENT = f"/criopy-torn-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def registry_and_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, str]]:
    with busybox_registry(tmp_path_factory.mktemp("torn-pods-registry"), "torn/busybox") as found:
        yield found


@pytest.fixture
def stack(registry_and_image: tuple[Registry, str]) -> Iterator[Stack]:
    port = free_port()
    with bridge_stack("cptp-", CGROUP_PARENT, "--set", "crio.metrics.enable_metrics=true",
                      "--set", f"crio.metrics.metrics_port={port}", registry=registry_and_image[0]) as s:
        s.metrics_port = port  # type: ignore[attr-defined]
        yield s


def pod_config(name: str) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="torn", uid=secrets.token_hex(8), attempt=1),
        hostname=name, labels={"app": name},
        linux=api_pb2.LinuxPodSandboxConfig(
            cgroup_parent=f"{CGROUP_PARENT}/{name}",
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NamespaceMode.CONTAINER))))


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "half" else os.urandom(max(len(data), 16)))


def quarantined(directory: Path) -> list[str]:
    """The kinds of what is in a quarantine directory, one per damaged record."""
    return sorted(entry.name.split("-")[0] for entry in directory.iterdir()) if directory.is_dir() else []


@pytest.mark.parametrize("how", ["half", "garbage"])
def test_a_pod_whose_records_are_torn_is_found_and_removed_without_leaks(
        stack: Stack, registry_and_image: tuple[Registry, str], how: str) -> None:
    image = registry_and_image[1]
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
    pod = pod_config(f"torn-{how}")
    pod_id = run_pod(stack, pod)
    cid = create(stack, pod_id, pod, container_config("sleeper", image, ["sleep", "3600"]))
    stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    assert wait_state(stack, cid, api_pb2.ContainerState.CONTAINER_RUNNING).state == \
        api_pb2.ContainerState.CONTAINER_RUNNING
    runtimed, netd = stack.dirs.root / "runtimed", stack.dirs.root / "netd"

    stack.stop()
    records = sorted(runtimed.glob("records/*/*.json")) + sorted(netd.glob("pods/*.json"))
    cache = sorted((netd / "cni-cache" / "results").iterdir())
    assert len(records) == 3 and len(cache) == 1
    # Cut in half: the records only (the CNI cache lets DEL run). Garbage: the CNI cache too.
    for path in records + (cache if how == "garbage" else []):
        damage(path, how)
    stack.restart()

    # Every damaged file is in quarantine, and the log and the metric say which.
    assert quarantined(runtimed / "quarantine") == ["container", "sandbox"]
    assert quarantined(netd / "quarantine") == (["cni_cache", "pod_network"] if how == "garbage" else ["pod_network"])
    logged = [json.loads(line) for line in stack.logs().splitlines() if '"state_record_quarantined"' in line]
    assert {path for entry in logged for path in entry["paths"]} == \
        {str(p) for p in records + (cache if how == "garbage" else [])}
    samples = scrape(stack.metrics_port)  # type: ignore[attr-defined]
    for service, kind in [("runtimed", "sandbox"), ("runtimed", "container"), ("netd", "pod_network")]:
        assert value(samples, "criopy_state_records_quarantined_total", service=service, kind=kind) == 1

    # The pod is found again, NOTREADY and known by its metadata; its container was left running.
    pods = stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    assert [(p.id, p.state) for p in pods] == [(pod_id, api_pb2.PodSandboxState.SANDBOX_NOTREADY)]
    assert pods[0].metadata == pod.metadata
    containers = stack.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
    assert [(c.id, c.pod_sandbox_id, c.state) for c in containers] == \
        [(cid, pod_id, api_pb2.ContainerState.CONTAINER_RUNNING)]
    assert containers[0].metadata.name == "sleeper" and containers[0].labels["c"] == "sleeper"
    assert containers[0].image.image == image

    # As the kubelet does with a NOTREADY pod: stop it, remove it. Nothing of it is left.
    stack.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    assert stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items == []
    assert leftovers(stack, CGROUP_PARENT) == {kind: [] for kind in leftovers(stack, CGROUP_PARENT)}
    assert os.listdir(stack.dirs.root / "storaged" / "rootfs") == []

    # And the node goes on: the same pod made again runs.
    again = run_pod(stack, pod)
    assert stack.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=again),
                                          timeout=10).status.state == api_pb2.PodSandboxState.SANDBOX_READY
