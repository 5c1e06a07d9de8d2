"""The drill: restart each service in turn while pods churn; nothing is lost or leaked."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import Counter

import grpc
import pytest
from cri_api.v1 import api_pb2

from shared.services import START_ORDER
from tests.e2e.test_pods import (  # noqa: F401 - fixtures
    busybox, container_config, create, pod_config, pod_stack, registry, registry_and_image, run_pod, wait_state)
from tests.support.pods import conmon_pids, leftover_mounts, runc_ids
from tests.support.stack import Stack, criopy

pytestmark = pytest.mark.root

CALL_TIMEOUT = 15.0


def _host_pids_running(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if open(f"/proc/{entry}/cmdline", "rb").read() == f"sleep\0{marker}\0".encode():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


class Churn:
    """Pods made and removed in a loop, each step retried as the kubelet does."""

    def __init__(self, stack: Stack, image: str) -> None:
        self.stack = stack
        self.image = image
        self.stop = threading.Event()
        self.failures: Counter[str] = Counter()
        self.late: list[str] = []
        self.cycles = 0

    def _retry(self, what: str, fn):  # type: ignore[no-untyped-def]
        while True:
            started = time.monotonic()
            try:
                return fn()
            except grpc.RpcError as e:
                elapsed = time.monotonic() - started
                self.failures[e.code().name] += 1
                if elapsed > CALL_TIMEOUT + 1:
                    self.late.append(f"{what} took {elapsed:.1f}s")
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise AssertionError(f"{what} failed with {e.code().name}: {e.details()}") from None
                time.sleep(0.2)

    def run(self) -> None:
        rt = self.stack.runtime
        n = 0
        while not self.stop.is_set():
            n += 1
            pod = pod_config(f"drill{n}")
            pod_id = self._retry("RunPodSandbox", lambda: rt.RunPodSandbox(
                api_pb2.RunPodSandboxRequest(config=pod), timeout=CALL_TIMEOUT).pod_sandbox_id)
            config = container_config("c", self.image, ["sleep", "600"])
            cid = self._retry("CreateContainer", lambda: rt.CreateContainer(api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=config, sandbox_config=pod), timeout=CALL_TIMEOUT).container_id)
            self._retry("StartContainer", lambda: rt.StartContainer(
                api_pb2.StartContainerRequest(container_id=cid), timeout=CALL_TIMEOUT))
            self._retry("StopPodSandbox", lambda: rt.StopPodSandbox(
                api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT))
            self._retry("RemovePodSandbox", lambda: rt.RemovePodSandbox(
                api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT))
            self.cycles += 1


def _restart(stack: Stack, service: str) -> None:
    before = stack.pid(service)
    result = criopy(stack.dirs, "restart", service)
    assert result.returncode == 0, result.stderr
    deadline = time.time() + 30
    while time.time() < deadline:
        status = stack.status().get(service, {})
        if status.get("state") == "up" and status.get("ready") and status.get("pid") not in (None, before):
            return
        time.sleep(0.2)
    raise AssertionError(f"{service} did not come back: {stack.status()}")


def test_restarting_each_service_during_pod_churn_loses_nothing(pod_stack: Stack, busybox: str) -> None:  # noqa: F811
    stack = pod_stack
    rt = stack.runtime
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=60)
    marker = str(3000 + secrets.randbelow(600))
    keeper = pod_config("keeper")
    keeper_id = run_pod(stack, keeper)
    keeper_cid = create(stack, keeper_id, keeper, container_config("keep", busybox, ["sleep", marker]))
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=keeper_cid), timeout=30)
    assert wait_state(stack, keeper_cid, api_pb2.ContainerState.CONTAINER_RUNNING).state == \
        api_pb2.ContainerState.CONTAINER_RUNNING
    keeper_pids = _host_pids_running(marker)
    assert len(keeper_pids) == 1

    churn = Churn(stack, busybox)
    worker = threading.Thread(target=churn.run)
    worker.start()
    try:
        for service in START_ORDER:
            time.sleep(1.0)  # let the churn run against the fresh service
            _restart(stack, service)
        time.sleep(1.0)
    finally:
        churn.stop.set()
        worker.join(timeout=120)
    assert not worker.is_alive()
    assert churn.cycles >= 3
    assert churn.late == []
    assert set(churn.failures) <= {"UNAVAILABLE"}, churn.failures

    # The keeper never stopped: same process, still running, still answering.
    assert _host_pids_running(marker) == keeper_pids
    status = rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=keeper_cid), timeout=10).status
    assert status.state == api_pb2.ContainerState.CONTAINER_RUNNING
    assert rt.ExecSync(api_pb2.ExecSyncRequest(container_id=keeper_cid, cmd=["true"], timeout=10),
                       timeout=30).exit_code == 0
    assert all(s["restarts"] == 1 for s in stack.status().values())

    # Nothing leaked by the churn: only the keeper remains.
    assert [p.id for p in rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items] == [keeper_id]
    assert [c.id for c in rt.ListContainers(api_pb2.ListContainersRequest(), timeout=30).containers] == [keeper_cid]
    assert runc_ids(stack) <= {keeper_cid, keeper_id}
    assert len(conmon_pids(stack.dirs.base)) == 1
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=keeper_id), timeout=30)
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=keeper_id), timeout=30)
    assert conmon_pids(stack.dirs.base) == []
    netns = sorted(p.name for p in stack.dirs.netns.iterdir())
    assert netns == []
    assert leftover_mounts(stack) == []
