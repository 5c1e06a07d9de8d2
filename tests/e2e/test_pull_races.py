"""PullImage racing RemoveImage, many times: a pull that succeeds has every layer it needs, and a container
of its image runs; the removal's layer collection never takes a layer a pull is about to record."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from services.storaged.digests import chain_ids
from tests.e2e.test_disk_full import exec_out
from tests.e2e.test_pods import CGROUP_PARENT, container_config, create, pod_config, run_pod, wait_state
from tests.support import images
from tests.support.pods import bridge_stack, leftover_mounts
from tests.support.registry import Registry, start_registry
from tests.support.stack import Stack

pytestmark = pytest.mark.root

ROUNDS = 12


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("race-registry")) as reg:
        yield reg


def pushed_with(registry: Registry, name: str) -> images.Pushed:
    """busybox (a layer every such image shares) and a small layer of its own."""
    own = images.Layer(images.build_tar([images.file_entry(f"etc/{name}", name.encode())]))
    return images.push_image(registry, f"race/{name}", "latest", images.Image([images.busybox_layer(), own]))


@pytest.fixture
def stack(registry: Registry) -> Iterator[Stack]:
    with bridge_stack("cppr-", CGROUP_PARENT, registry=registry) as s:
        yield s


def pull(stack: Stack, ref: str) -> str:
    return stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=120).image_ref


def remove(stack: Stack, ref: str) -> None:
    stack.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=60)


def present(stack: Stack, ref: str) -> bool:
    return stack.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)),
                                    timeout=10).HasField("image")


def assert_usable(stack: Stack, pod_id: str, pod: api_pb2.PodSandboxConfig, image: images.Pushed, name: str) -> None:
    """Every layer of the image is in the store, and a container of it runs."""
    layers = stack.dirs.root / "storaged" / "layers"
    missing = [c for c in chain_ids(image.diff_ids) if not (layers / c.split(":")[1] / "layer.json").is_file()]
    assert missing == [], f"{image.ref}: layers {missing} are gone although the image is present"
    cid = create(stack, pod_id, pod, container_config(name, image.ref, ["sleep", "3600"]))
    stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    assert wait_state(stack, cid, api_pb2.ContainerState.CONTAINER_RUNNING).state == \
        api_pb2.ContainerState.CONTAINER_RUNNING
    assert exec_out(stack, cid, "cat", f"/etc/{image.repo.split('/')[1]}") == image.repo.split("/")[1]
    stack.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=30)
    stack.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)


def race(*calls) -> list[BaseException | None]:  # type: ignore[no-untyped-def]
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.exception() for f in futures]


@contextmanager
def removing_all_along(stack: Stack, ref: str) -> Iterator[list[int]]:
    """RemoveImage of `ref` over and over, at least once: each one (also of an image already gone) collects
    unused layers. The last one has ended when the block is left."""
    stop = threading.Event()
    done = [0]
    errors: list[BaseException] = []

    def hammer() -> None:
        while True:
            try:
                remove(stack, ref)
                done[0] += 1
            except BaseException as e:  # reported by the test, not lost in the thread
                errors.append(e)
                return
            if stop.is_set():
                return

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join()
    assert errors == []


def test_pull_racing_the_removal_of_an_image_sharing_its_layers(stack: Stack, registry: Registry) -> None:
    a, b = pushed_with(registry, "alpha"), pushed_with(registry, "beta")
    pod = pod_config("race-shared")
    pod_id = run_pod(stack, pod)
    for round_ in range(ROUNDS):
        pull(stack, b.ref)
        pulled, removed = race(lambda: pull(stack, a.ref), lambda: remove(stack, b.ref))
        assert pulled is None and removed is None, (pulled, removed)
        assert present(stack, a.ref) and not present(stack, b.ref)
        assert_usable(stack, pod_id, pod, a, f"alpha-{round_}")
        remove(stack, a.ref)  # the next round unpacks every layer of it again
    # Collections all through each pull, at every step of it, not only at its start.
    for round_ in range(ROUNDS):
        with removing_all_along(stack, b.ref):
            assert pull(stack, a.ref) == a.image_id
        assert_usable(stack, pod_id, pod, a, f"alpha-again-{round_}")
        remove(stack, a.ref)
    stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    assert leftover_mounts(stack) == []


def test_pull_racing_the_removal_of_the_same_image(stack: Stack, registry: Registry) -> None:
    a = pushed_with(registry, "gamma")
    pod = pod_config("race-same")
    pod_id = run_pod(stack, pod)
    for round_ in range(ROUNDS):
        pulled, removed = race(lambda: pull(stack, a.ref), lambda: remove(stack, a.ref))
        assert removed is None, removed
        # The pull may lose to the removal (its record went before it was ready), and say so.
        assert pulled is None or (isinstance(pulled, grpc.RpcError) and
                                  pulled.code() == grpc.StatusCode.NOT_FOUND), pulled
        # Whatever the order: an image reported present is usable.
        if present(stack, a.ref):
            assert_usable(stack, pod_id, pod, a, f"gamma-{round_}")
            remove(stack, a.ref)
    stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    assert leftover_mounts(stack) == []
