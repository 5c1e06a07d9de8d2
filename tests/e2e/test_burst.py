"""Fifty pods at once, as the kubelet starts them after a node restart, then all stopped and removed at once.

Every pod's RunPodSandbox, CreateContainer and StartContainer run in parallel,
one thread per pod, with the services' health asked all along; then every
pod's StopPodSandbox and RemovePodSandbox. Every call succeeds, each pod is
listed once with its own address and its container running, the services
answer their health during the burst (no request slot runs out), and once the
pods are gone nothing is left: mounts, network namespaces, veths, IP leases,
cgroups, conmon, runc containers, and each service's open file descriptors
are back to what they were. How long it takes is `make bench`'s concern
(tests/bench/bench_burst.py), not this test's.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import pytest
from cri_api.v1 import api_pb2

from shared.services import START_ORDER
# The pod tests' registry, image and stack fixtures.
from tests.e2e.test_pods import (CGROUP_PARENT, busybox, container_config, pod_config, pod_stack,  # noqa: F401
                                 registry, registry_and_image)
from tests.support.pods import leftovers, new_leftovers
from tests.support.stack import Stack, status_of

pytestmark = pytest.mark.root

BURST = 50
# Deadlines of one call in the burst: generous, the machine is shared; no call may fail.
CALL_TIMEOUT = 240
# File descriptors a service may hold beyond its count before the burst: lazily made things.
FD_SLACK = 8


def start_pod(stack: Stack, image: str, n: int) -> tuple[str, str]:
    rt = stack.runtime
    pod = pod_config(f"burst-{n}")
    pod_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=CALL_TIMEOUT).pod_sandbox_id
    cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=container_config("sleep", image, ["sleep", "3600"]), sandbox_config=pod),
        timeout=CALL_TIMEOUT).container_id
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=CALL_TIMEOUT)
    return pod_id, cid


def stop_pod(stack: Stack, pod_id: str) -> None:
    stack.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT)
    stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT)


def open_fds(stack: Stack) -> dict[str, int]:
    return {name: len(os.listdir(f"/proc/{stack.pid(name)}/fd")) for name in START_ORDER}


class HealthDuring:
    """Asks every service's health, again and again, while a burst runs: when each answer came, and
    the answers that were not "up"."""

    def __init__(self, stack: Stack) -> None:
        # Time to answer as a busy machine needs: what matters is that the answer comes during the burst.
        self._config = stack.config("--set", "criopy.bus.health_timeout=30")
        self._stop = threading.Event()
        self.answered: list[float] = []
        self.down: list[dict] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            report = status_of(self._config)
            self.down += [s for s in report.values() if s.get("state") != "up"]
            self.answered.append(time.monotonic())
            time.sleep(0.1)

    def __enter__(self) -> "HealthDuring":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_fifty_pods_at_once_then_all_removed_at_once(pod_stack: Stack, busybox: str) -> None:
    stack, image = pod_stack, busybox
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
    # A first pod, there all along: what is made once (the bridge, the pin directory) is made.
    first_id, _ = start_pod(stack, image, BURST)
    before, fds_before = leftovers(stack, CGROUP_PARENT), open_fds(stack)

    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        with HealthDuring(stack) as health:
            started = list(pool.map(lambda n: start_pod(stack, image, n), range(BURST)))
            burst_ended = time.monotonic()
        # The services answered while the burst was under way, and said they were up.
        assert health.down == [] and health.answered and health.answered[0] < burst_ended

        pods = [p for p in stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items
                if p.id != first_id]
        assert sorted(p.id for p in pods) == sorted(pod_id for pod_id, _ in started)
        assert {p.state for p in pods} == {api_pb2.PodSandboxState.SANDBOX_READY}
        assert sorted(p.metadata.name for p in pods) == sorted(f"burst-{n}" for n in range(BURST))
        containers = [c for c in stack.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=30).containers
                      if c.pod_sandbox_id != first_id]
        assert sorted((c.pod_sandbox_id, c.id) for c in containers) == sorted(started)
        assert {c.state for c in containers} == {api_pb2.ContainerState.CONTAINER_RUNNING}
        addresses = {stack.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id),
                                                    timeout=30).status.network.ip for pod_id, _ in started}
        assert len(addresses) == BURST and "" not in addresses

        with HealthDuring(stack) as health:
            list(pool.map(lambda started_pod: stop_pod(stack, started_pod[0]), started))
            burst_ended = time.monotonic()
        assert health.down == [] and health.answered and health.answered[0] < burst_ended

    assert [p.id for p in stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items] == \
        [first_id]
    assert new_leftovers(stack, CGROUP_PARENT, before) == {}
    fds_after = open_fds(stack)
    assert {name: n for name, n in fds_after.items() if n > fds_before[name] + FD_SLACK} == {}, \
        (fds_before, fds_after)
    stop_pod(stack, first_id)
    assert leftovers(stack, CGROUP_PARENT) == {kind: [] for kind in before}
