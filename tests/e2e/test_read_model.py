"""The read model through the real CRI socket: reads after writes under churn, restarts, and turning it off.

List* and *Status are answered from the frontend's memory; these tests hold
it to what a hop to runtimed would answer: a read that follows a write sees
it, whatever else runs at the same time, and restarting runtimed (even with a
container dying meanwhile) or the frontend leaves no stale answer behind.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from typing import Callable, Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.e2e.test_pods import (  # noqa: F401 - fixtures
    busybox, container_config, create, pod_config, pod_stack, registry, registry_and_image, run_pod)
from tests.e2e.test_restart_drill import _host_pids_running, _restart
from tests.support.pods import bridge_stack
from tests.support.registry import Registry
from tests.support.stack import Stack

pytestmark = pytest.mark.root

WRITERS = 4
ROUNDS = 4
READERS = 3

CREATED, RUNNING, EXITED = (api_pb2.ContainerState.CONTAINER_CREATED, api_pb2.ContainerState.CONTAINER_RUNNING,
                            api_pb2.ContainerState.CONTAINER_EXITED)


def listed(stack: Stack) -> dict[str, int]:
    return {c.id: c.state for c in stack.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers}


def pods(stack: Stack) -> dict[str, int]:
    return {p.id: p.state for p in stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items}


def state(stack: Stack, cid: str) -> int:
    return stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status.state


def not_found(call: Callable[[], object]) -> bool:
    try:
        call()
    except grpc.RpcError as e:
        return e.code() == grpc.StatusCode.NOT_FOUND
    return False


def eventually(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether `predicate` holds within `timeout`; a call failing meanwhile (a daemon restarting) is a no."""
    deadline = time.time() + timeout
    while True:
        try:
            if predicate():
                return True
        except grpc.RpcError:
            pass
        if time.time() > deadline:
            return False
        time.sleep(0.05)


def synced_count(stack: Stack, daemon: str) -> int:
    """How many times the frontend built its copy of `daemon`, from its log."""
    count = 0
    for line in stack.logs().splitlines():
        if '"read_model_synced"' in line:
            try:
                count += json.loads(line).get("daemon") == daemon
            except ValueError:
                pass
    return count


def a_container(stack: Stack, image: str, name: str, command: list[str],
                start: bool = True) -> tuple[api_pb2.PodSandboxConfig, str, str]:
    """A pod with one container (started unless told not to): its config, its id and the container's."""
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=60)
    pod = pod_config(name)
    pod_id = run_pod(stack, pod)
    cid = create(stack, pod_id, pod, container_config("c", image, command))
    if start:
        stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    return pod, pod_id, cid


class Workers:
    """Threads that run a body until told to stop; the first failure of any is kept."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.failures: list[str] = []
        self._threads: list[threading.Thread] = []

    def start(self, body: Callable[[], None], *, loop: bool) -> None:
        def run() -> None:
            try:
                while True:
                    body()
                    if not loop or self.stop.is_set():
                        return
            except BaseException as e:  # kept for the main thread's assertion
                self.failures.append(f"{type(e).__name__}: {e}")
                self.stop.set()

        thread = threading.Thread(target=run)
        thread.start()
        self._threads.append(thread)

    def join(self, timeout: float = 300) -> None:
        for thread in self._threads:
            thread.join(timeout)
        assert not any(t.is_alive() for t in self._threads)


def test_reads_after_writes_see_them_while_others_write_and_read(pod_stack: Stack, busybox: str) -> None:  # noqa: F811
    stack = pod_stack
    rt = stack.runtime
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=60)
    writers, readers = Workers(), Workers()
    reads = [0]

    def writer() -> None:
        pod = pod_config(f"churn-{secrets.token_hex(3)}")
        pod_id = run_pod(stack, pod)
        assert pods(stack).get(pod_id) == api_pb2.SANDBOX_READY
        for n in range(ROUNDS):
            cid = create(stack, pod_id, pod, container_config(f"c{n}", busybox, ["sleep", "600"]))
            assert listed(stack).get(cid) == CREATED and state(stack, cid) == CREATED
            rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
            assert state(stack, cid) == RUNNING and listed(stack).get(cid) == RUNNING
            rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=30)
            status = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status
            assert status.state == EXITED and status.exit_code == 137 and status.finished_at > 0
            only = rt.ListContainers(api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(
                pod_sandbox_id=pod_id, state=api_pb2.ContainerStateValue(state=EXITED))), timeout=10).containers
            assert cid in [c.id for c in only]
            rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
            assert cid not in listed(stack)
            assert not_found(lambda: state(stack, cid))
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=30)
        assert pods(stack).get(pod_id) == api_pb2.SANDBOX_NOTREADY
        assert rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id),
                                   timeout=10).status.state == api_pb2.SANDBOX_NOTREADY
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=30)
        assert pod_id not in pods(stack)
        assert not_found(lambda: rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id),
                                                     timeout=10))

    def reader() -> None:
        rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10)
        rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10)
        conditions = rt.Status(api_pb2.StatusRequest(), timeout=10).status.conditions
        assert all(c.status for c in conditions), conditions
        assert stack.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=busybox)),
                                        timeout=10).image.id
        assert len(stack.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images) == 1
        reads[0] += 1

    for _ in range(READERS):
        readers.start(reader, loop=True)
    for _ in range(WRITERS):
        writers.start(writer, loop=False)
    writers.join()
    readers.stop.set()
    readers.join()
    assert writers.failures == [] and readers.failures == []
    assert reads[0] > 0
    assert pods(stack) == {} and listed(stack) == {}


def test_a_runtimed_killed_while_a_container_dies_leaves_no_stale_answer(pod_stack: Stack, busybox: str) -> None:  # noqa: F811
    stack = pod_stack
    rt = stack.runtime
    marker = str(4000 + secrets.randbelow(600))
    pod, pod_id, cid = a_container(stack, busybox, "dies", ["sleep", marker])
    assert state(stack, cid) == RUNNING
    before = synced_count(stack, "runtimed")
    runtimed = stack.pid("runtimed")

    os.kill(runtimed, signal.SIGKILL)
    [pid] = _host_pids_running(marker)
    os.kill(pid, signal.SIGKILL)  # dies while runtimed is down: only its restart can tell
    # No write: the copy must not go on saying RUNNING once runtimed is back.
    assert eventually(lambda: stack.status()["runtimed"].get("pid") not in (None, runtimed)
                      and stack.status()["runtimed"].get("ready"))
    assert eventually(lambda: state(stack, cid) == EXITED)
    assert listed(stack) == {cid: EXITED}
    assert eventually(lambda: synced_count(stack, "runtimed") > before)

    # A restart through the supervisor, then writes: each read sees them.
    _restart(stack, "runtimed")
    second = create(stack, pod_id, pod, container_config("second", busybox, ["sleep", "600"]))
    assert listed(stack) == {cid: EXITED, second: CREATED}
    rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    assert listed(stack) == {second: CREATED}


def test_a_restarted_frontend_builds_its_copy_again(pod_stack: Stack, busybox: str) -> None:  # noqa: F811
    stack = pod_stack
    rt = stack.runtime
    _pod, pod_id, cid = a_container(stack, busybox, "kept", ["sleep", "600"])
    before = {d: synced_count(stack, d) for d in ("runtimed", "imaged")}

    _restart(stack, "frontend")
    assert pods(stack) == {pod_id: api_pb2.SANDBOX_READY} and listed(stack) == {cid: RUNNING}
    assert [i.id for i in stack.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images]
    assert eventually(lambda: all(synced_count(stack, d) > n for d, n in before.items()))
    rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=30)
    assert state(stack, cid) == EXITED and listed(stack) == {cid: EXITED}


@pytest.fixture
def plain_stack(registry: Registry) -> Iterator[Stack]:  # noqa: F811
    with bridge_stack("cpo-", f"/criopy-e2e-{secrets.token_hex(3)}", "--set", "criopy.frontend.read_model=false",
                      registry=registry) as stack:
        yield stack


def test_turned_off_every_read_asks_the_daemons(plain_stack: Stack, busybox: str) -> None:  # noqa: F811
    stack = plain_stack
    rt = stack.runtime
    _pod, pod_id, cid = a_container(stack, busybox, "plain", ["sleep", "600"], start=False)
    assert listed(stack) == {cid: CREATED}
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    assert state(stack, cid) == RUNNING and pods(stack) == {pod_id: api_pb2.SANDBOX_READY}
    assert all(c.status for c in rt.Status(api_pb2.StatusRequest(), timeout=10).status.conditions)
    assert stack.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=busybox)),
                                    timeout=10).image.id
    assert '"read_model_synced"' not in stack.logs()
