"""Torn state at start: crio-py is stopped, its records are damaged (cut in half, as a power cut leaves
a file whose pages never reached the disk, or overwritten with garbage, as a disk fault does), and it is
started again.

Each time it starts, moves the damaged files aside (they are in the quarantine directory, a log line and
a metric say which), and the kubelet keeps working. The image side: a pulled image either still runs
containers (its layers unpacked again from the blobs, its records made again from their copies) or is
reported absent, and a pull makes it work again; a container that ran through it all is untouched. The
pod side: a pod whose records are lost is found again, NOTREADY with its metadata, its container still
running; once the kubelet has stopped and removed it, nothing of it is left: mounts, network namespaces,
veths, IP leases, cgroups, conmon, runc containers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest
from cri_api.v1 import api_pb2

from services.runtimed import cgroups
from services.storaged.digests import chain_ids
from tests.e2e.test_disk_full import exec_out
from tests.e2e.test_metrics import free_port, scrape, value
from tests.e2e.test_pods import CGROUP_PARENT, container_config, create, pod_config, run_pod, wait_state
from tests.support import images
from tests.support.pods import bridge_stack, leftover_mounts, leftovers, new_leftovers
from tests.support.registry import Registry, start_registry
from tests.support.stack import Stack

pytestmark = pytest.mark.root

MOTD = b"made of two layers\n"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("torn-registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def app(registry: Registry) -> images.Pushed:
    image = images.Image([images.busybox_layer(), images.Layer(images.build_tar([images.file_entry("etc/motd", MOTD)]))])
    return images.push_image(registry, "torn/app", "latest", image)


@pytest.fixture
def stack(registry: Registry) -> Iterator[Stack]:
    port = free_port()
    with bridge_stack("cpts-", CGROUP_PARENT, "--set", "crio.metrics.enable_metrics=true",
                      "--set", f"crio.metrics.metrics_port={port}", registry=registry) as s:
        s.metrics_port = port  # type: ignore[attr-defined]
        yield s


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "half" else os.urandom(max(len(data), 16)))


def pull(stack: Stack, ref: str) -> str:
    return stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=120).image_ref


def image_status(stack: Stack, ref: str) -> api_pb2.ImageStatusResponse:
    return stack.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)), timeout=10)


def run_container(stack: Stack, pod_id: str, pod: api_pb2.PodSandboxConfig, name: str, ref: str) -> str:
    cid = create(stack, pod_id, pod, container_config(name, ref, ["sleep", "3600"]))
    stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    assert wait_state(stack, cid, api_pb2.ContainerState.CONTAINER_RUNNING).state == \
        api_pb2.ContainerState.CONTAINER_RUNNING
    return cid


def assert_runs(stack: Stack, ref: str, name: str) -> None:
    """A container of the image runs in a pod of its own; once the pod is gone, nothing stays mounted."""
    pod = pod_config(name)
    pod_id = run_pod(stack, pod)
    cid = run_container(stack, pod_id, pod, "app", ref)
    assert exec_out(stack, cid, "cat", "/etc/motd").encode() == MOTD
    remove_pod(stack, pod_id)
    assert leftover_mounts(stack) == []


def quarantine_logged(stack: Stack) -> list[dict]:
    return [json.loads(line) for line in stack.logs().splitlines() if '"state_record_quarantined"' in line]


def remove_pod(stack: Stack, pod_id: str) -> None:
    stack.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)


@pytest.mark.parametrize("how", ["half", "garbage"])
def test_torn_layer_and_rootfs_records(stack: Stack, app: images.Pushed, how: str) -> None:
    pull(stack, app.ref)
    pod = pod_config(f"torn-{how}")
    pod_id = run_pod(stack, pod)
    before = run_container(stack, pod_id, pod, "before", app.ref)
    storaged = stack.dirs.root / "storaged"

    stack.stop()
    layer_records = sorted(storaged.glob("layers/*/layer.json"))
    rootfs_records = sorted(storaged.glob("rootfs/*/rootfs.json"))
    assert len(layer_records) == 2 and len(rootfs_records) == 1
    for record in layer_records + rootfs_records:
        damage(record, how)
    stack.restart()

    # Every damaged record was moved aside, and said so.
    quarantined = sorted(p.name for p in (storaged / "quarantine").iterdir())
    assert [n.split("-")[0] for n in quarantined] == ["layer", "layer", "rootfs"]
    logged = quarantine_logged(stack)
    assert sorted(entry["kind"] for entry in logged) == ["layer", "layer", "rootfs"]
    assert {path for entry in logged for path in entry["paths"]} == {str(p) for p in layer_records + rootfs_records}
    samples = scrape(stack.metrics_port)  # type: ignore[attr-defined]
    assert value(samples, "criopy_state_records_quarantined_total", service="storaged", kind="layer") == 2
    assert value(samples, "criopy_state_records_quarantined_total", service="storaged", kind="rootfs") == 1

    # The container that was running is untouched.
    assert exec_out(stack, before, "cat", "/etc/motd").encode() == MOTD
    # The image is still there, and a new container of it runs: its layers were unpacked again.
    assert image_status(stack, app.ref).image.id == app.image_id
    after = run_container(stack, pod_id, pod, "after", app.ref)
    assert exec_out(stack, after, "cat", "/etc/motd").encode() == MOTD
    assert sorted(os.listdir(storaged / "layers")) == sorted(c.split(":")[1] for c in chain_ids(app.diff_ids))

    # The old copies of the layers went with the last mount that used them; nothing stays mounted.
    remove_pod(stack, pod_id)
    assert os.listdir(storaged / "held") == []
    assert leftover_mounts(stack) == []


@pytest.mark.parametrize("how", ["half", "garbage"])
def test_damaged_image_database_is_rebuilt_from_the_record_copies(stack: Stack, app: images.Pushed,
                                                                  how: str) -> None:
    pull(stack, app.ref)
    imaged = stack.dirs.root / "imaged"
    stack.stop()
    damage(imaged / "images.db", how)
    stack.restart()

    moved = list((imaged / "quarantine").glob("image_database-*/images.db"))
    assert len(moved) == 1
    assert [e["kind"] for e in quarantine_logged(stack)] == ["image_database"]
    samples = scrape(stack.metrics_port)  # type: ignore[attr-defined]
    assert value(samples, "criopy_state_records_quarantined_total", service="imaged", kind="image_database") == 1

    status = image_status(stack, app.ref).image
    assert status.id == app.image_id and list(status.repo_tags) == [app.ref]
    assert list(status.repo_digests) == [app.digest_ref]
    assert_runs(stack, app.ref, f"db-{how}")


def test_damaged_image_database_without_copies_starts_empty_and_the_image_is_pulled_again(
        stack: Stack, app: images.Pushed) -> None:
    pull(stack, app.ref)
    imaged = stack.dirs.root / "imaged"
    stack.stop()
    damage(imaged / "images.db", "garbage")
    shutil.rmtree(imaged / "records")
    stack.restart()

    assert len(list((imaged / "quarantine").glob("image_database-*/images.db"))) == 1
    # Absent, as the kubelet must see it to pull it again; the blobs nothing needs are gone.
    assert not image_status(stack, app.ref).HasField("image")
    assert list(stack.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images) == []
    assert os.listdir(imaged / "blobs" / "sha256") == []

    assert pull(stack, app.ref) == app.image_id
    assert_runs(stack, app.ref, "db-empty")


def test_layers_lost_with_their_blobs_make_the_image_absent(stack: Stack, app: images.Pushed) -> None:
    pull(stack, app.ref)
    root = stack.dirs.root
    stack.stop()
    for record in root.glob("storaged/layers/*/layer.json"):
        damage(record, "garbage")
    (root / "imaged" / "blobs" / "sha256" / app.layer_digests[1].split(":")[1]).unlink()
    stack.restart()

    # imaged saw the missing blob at start: the image is not reported present, so the kubelet pulls it.
    assert not image_status(stack, app.ref).HasField("image")
    assert pull(stack, app.ref) == app.image_id
    assert_runs(stack, app.ref, "blobs-lost")


def quarantined(directory: Path) -> list[str]:
    """The kinds of what is in a quarantine directory, one per damaged record."""
    return sorted(entry.name.split("-")[0] for entry in directory.iterdir()) if directory.is_dir() else []


@pytest.mark.parametrize("how", ["half", "garbage"])
def test_a_pod_whose_records_are_torn_is_found_and_removed_without_leaks(
        stack: Stack, app: images.Pushed, how: str) -> None:
    pull(stack, app.ref)
    # As the kubelet does, the pods' parent cgroup is there before them: the pod's own is runtimed's.
    for directory in cgroups.controller_dirs(CGROUP_PARENT):
        os.makedirs(directory, exist_ok=True)
    before = leftovers(stack, CGROUP_PARENT)
    pod = pod_config(f"torn-pod-{how}", attempt=1)
    pod_id = run_pod(stack, pod)
    cid = run_container(stack, pod_id, pod, "sleeper", app.ref)
    runtimed, netd = stack.dirs.root / "runtimed", stack.dirs.root / "netd"

    stack.stop()
    records = sorted(runtimed.glob("records/*/*.json")) + sorted(netd.glob("pods/*.json"))
    cache = sorted((netd / "cni-cache" / "results").iterdir())
    assert len(records) == 3 and len(cache) == 1
    # Cut in half: the records only (the CNI result cache lets DEL run). Garbage: the cache too.
    damaged = records + (cache if how == "garbage" else [])
    for path in damaged:
        damage(path, how)
    stack.restart()

    # Every damaged file is in quarantine, and the log and the metric say which.
    assert quarantined(runtimed / "quarantine") == ["container", "sandbox"]
    assert quarantined(netd / "quarantine") == (["cni_cache", "pod_network"] if how == "garbage" else ["pod_network"])
    assert {path for entry in quarantine_logged(stack) for path in entry["paths"]} == {str(p) for p in damaged}
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
    assert (containers[0].metadata.name, containers[0].labels["c"], containers[0].image.image) == \
        ("sleeper", "sleeper", app.ref)

    # As the kubelet does with a NOTREADY pod: stop it, remove it. Nothing of it is left.
    remove_pod(stack, pod_id)
    assert stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items == []
    assert new_leftovers(stack, CGROUP_PARENT, before) == {}

    # And the node goes on: the same pod made again is ready.
    again = run_pod(stack, pod)
    assert stack.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=again),
                                          timeout=10).status.state == api_pb2.PodSandboxState.SANDBOX_READY
