"""Stats, metrics, container events, checkpoint and runtime updates through the real CRI socket."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import secrets
import signal
import socket
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from services.runtimed import checkpoint
from tests.support.pods import bridge_stack, busybox_registry, remove_pods
from tests.support.registry import Registry
from tests.support.stack import Stack

pytestmark = pytest.mark.root

CGROUP_PARENT = f"/criopy-se-{secrets.token_hex(3)}"
MiB = 1 << 20
METRIC_FAMILIES = ["cpu", "memory", "network", "process", "disk", "oom", "spec"]
State = api_pb2.ContainerState
Event = api_pb2.ContainerEventType


@pytest.fixture(scope="module")
def registry_and_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, str]]:
    with busybox_registry(tmp_path_factory.mktemp("stats-registry"), "stats/busybox",
                          cmd=["sh"], env=["PATH=/bin"]) as found:
        yield found


@pytest.fixture(scope="module")
def busybox(registry_and_image: tuple[Registry, str]) -> str:
    return registry_and_image[1]


@pytest.fixture(scope="module")
def stack(registry_and_image: tuple[Registry, str]) -> Iterator[Stack]:
    """One crio-py with a bridge network for the module; each test removes its pods."""
    registry, busybox = registry_and_image
    with bridge_stack("cps-", CGROUP_PARENT, "--set", f"crio.stats.included_pod_metrics={json.dumps(METRIC_FAMILIES)}",
                      registry=registry) as s:
        s.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=busybox)), timeout=60)
        yield s


@pytest.fixture
def rt(stack: Stack) -> Iterator[Stack]:
    try:
        yield stack
    finally:
        stack.wait_ready()
        remove_pods(stack)


def pod_config(name: str) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="stats", uid=secrets.token_hex(8)),
        hostname=name, labels={"app": name},
        linux=api_pb2.LinuxPodSandboxConfig(
            cgroup_parent=f"{CGROUP_PARENT}/{name}-{secrets.token_hex(2)}",
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NamespaceMode.CONTAINER))))


def run_pod(stack: Stack, name: str) -> tuple[str, api_pb2.PodSandboxConfig]:
    config = pod_config(name)
    pod_id = stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    return pod_id, config


def run_container(stack: Stack, pod: tuple[str, api_pb2.PodSandboxConfig], name: str, image: str,
                  command: list[str], *, memory_limit: int = 0, labels: dict[str, str] | None = None,
                  start: bool = True) -> str:
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name), image=api_pb2.ImageSpec(image=image), command=command,
        log_path=f"{name}.log", labels=labels or {"c": name})
    if memory_limit:
        config.linux.resources.memory_limit_in_bytes = memory_limit
    cid = stack.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod[0], config=config, sandbox_config=pod[1]), timeout=60).container_id
    if start:
        stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    return cid


def status(stack: Stack, cid: str) -> api_pb2.ContainerStatus:
    return stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status


def wait_state(stack: Stack, cid: str, state: int, timeout: float = 30) -> api_pb2.ContainerStatus:
    deadline = time.time() + timeout
    while True:
        st = status(stack, cid)
        if st.state == state or time.time() > deadline:
            return st
        time.sleep(0.05)


def exec_sync(stack: Stack, cid: str, cmd: list[str]) -> api_pb2.ExecSyncResponse:
    return stack.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=30), timeout=60)


def container_stats(stack: Stack, cid: str) -> api_pb2.ContainerStats:
    return stack.runtime.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid), timeout=10).stats


def list_stats(stack: Stack, **flt: Any) -> list[api_pb2.ContainerStats]:
    request = api_pb2.ListContainerStatsRequest(filter=api_pb2.ContainerStatsFilter(**flt))
    return list(stack.runtime.ListContainerStats(request, timeout=30).stats)


class EventClient:
    """A GetContainerEvents subscriber reading its stream in a thread."""

    def __init__(self, stack: Stack) -> None:
        self.channel = grpc.insecure_channel(f"unix://{stack.dirs.socket}")
        self.stream = api_pb2_grpc.RuntimeServiceStub(self.channel).GetContainerEvents(api_pb2.GetEventsRequest())
        self.events: queue.Queue[api_pb2.ContainerEventResponse] = queue.Queue()
        self.received: list[api_pb2.ContainerEventResponse] = []
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                self.events.put(event)
        except grpc.RpcError as e:
            self.error = e

    def wait_for(self, container_id: str, kind: int, timeout: float = 30) -> api_pb2.ContainerEventResponse:
        deadline = time.time() + timeout
        for seen in self.received:
            if seen.container_id == container_id and seen.container_event_type == kind:
                return seen
        while time.time() < deadline:
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            self.received.append(event)
            if event.container_id == container_id and event.container_event_type == kind:
                return event
        raise AssertionError(f"no {Event.Name(kind)} for {container_id[:12]}; got "
                             f"{[(e.container_id[:12], Event.Name(e.container_event_type)) for e in self.received]}")

    def types_for(self, container_id: str) -> list[str]:
        while not self.events.empty():
            self.received.append(self.events.get_nowait())
        return [Event.Name(e.container_event_type) for e in self.received if e.container_id == container_id]

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()
        self.thread.join(5)


@pytest.fixture
def subscribers(rt: Stack) -> Iterator[list[EventClient]]:
    clients = [EventClient(rt), EventClient(rt)]
    try:
        # The stream is open once the first event (a throwaway pod) reaches both clients.
        pod_id, _ = run_pod(rt, "probe")
        for c in clients:
            c.wait_for(pod_id, Event.CONTAINER_CREATED_EVENT)
        yield clients
    finally:
        for c in clients:
            c.close()


# -- stats -------------------------------------------------------------------------------------


def knock(ip: str) -> None:
    """Traffic through a pod's eth0 from the host: a SYN in, a RST out (no program needed in the pod)."""
    try:
        socket.create_connection((ip, 9), timeout=2).close()
    except OSError:
        pass


def test_container_and_pod_stats(rt: Stack, busybox: str):
    server = run_pod(rt, "server")
    client = run_pod(rt, "client")
    busy = run_container(rt, client, "busy", busybox, ["sh", "-c", "while :; do :; done"], labels={"role": "cpu"})
    hog = run_container(rt, client, "hog", busybox, ["sleep", "600"], labels={"role": "mem"})
    target = run_container(rt, server, "target", busybox, ["sleep", "600"], labels={"role": "mem"})

    first_busy, first_hog = container_stats(rt, busy), container_stats(rt, hog)
    before_net = rt.runtime.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=client[0]),
                                            timeout=10).stats.linux.network
    assert exec_sync(rt, hog, ["dd", "if=/dev/zero", "of=/dev/shm/blob", "bs=1M", "count=40"]).exit_code == 0
    assert exec_sync(rt, hog, ["dd", "if=/dev/zero", "of=/root/layer", "bs=1M", "count=2"]).exit_code == 0
    client_ip = rt.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=client[0]),
                                            timeout=10).status.network.ip
    for _ in range(3):
        knock(client_ip)
    time.sleep(1.0)
    busy_stats, hog_stats = container_stats(rt, busy), container_stats(rt, hog)

    cpu = busy_stats.cpu
    assert cpu.usage_core_nano_seconds.value - first_busy.cpu.usage_core_nano_seconds.value > 200_000_000
    assert 200_000_000 < cpu.usage_nano_cores.value <= os.cpu_count() * 1_100_000_000
    assert busy_stats.attributes.metadata.name == "busy" and busy_stats.attributes.labels["role"] == "cpu"
    assert hog_stats.memory.working_set_bytes.value >= 40 * MiB > first_hog.memory.working_set_bytes.value
    assert hog_stats.memory.usage_bytes.value >= hog_stats.memory.working_set_bytes.value
    assert hog_stats.memory.page_faults.value > 0
    layer = hog_stats.writable_layer
    assert layer.used_bytes.value >= 2 * MiB and layer.inodes_used.value >= 2 and layer.fs_id.mountpoint
    assert layer.used_bytes.value > first_hog.writable_layer.used_bytes.value

    # Filters; the list agrees with the single calls.
    every = {s.attributes.id: s for s in list_stats(rt)}
    assert set(every) == {busy, hog, target}
    assert {s.attributes.id for s in list_stats(rt, pod_sandbox_id=client[0])} == {busy, hog}
    assert {s.attributes.id for s in list_stats(rt, label_selector={"role": "mem"})} == {hog, target}
    assert [s.attributes.id for s in list_stats(rt, id=busy[:12])] == [busy]
    assert list_stats(rt, pod_sandbox_id=client[0], label_selector={"role": "nope"}) == []
    assert every[hog].attributes == hog_stats.attributes
    assert every[hog].writable_layer.used_bytes.value == hog_stats.writable_layer.used_bytes.value
    with pytest.raises(grpc.RpcError) as err:
        container_stats(rt, "0" * 64)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # The pod: its cgroup, its processes, its network counters, its containers.
    pod = rt.runtime.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=client[0]), timeout=10).stats
    assert pod.attributes.id == client[0] and pod.attributes.metadata.namespace == "stats"
    assert pod.linux.memory.working_set_bytes.value >= 40 * MiB
    assert pod.linux.cpu.usage_core_nano_seconds.value >= cpu.usage_core_nano_seconds.value
    assert pod.linux.process.process_count.value >= 2
    assert {c.attributes.id for c in pod.linux.containers} == {busy, hog}
    net = pod.linux.network
    assert net.default_interface.name == "eth0" and [i.name for i in net.interfaces] == ["eth0"]

    def counters_moved(net: api_pb2.NetworkUsage) -> bool:
        return (net.default_interface.tx_bytes.value > before_net.default_interface.tx_bytes.value
                and net.default_interface.rx_bytes.value > before_net.default_interface.rx_bytes.value)

    assert counters_moved(net), (before_net, net)
    listed = rt.runtime.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(), timeout=10).stats
    assert {p.attributes.id for p in listed} == {client[0], server[0]}
    only = rt.runtime.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(
        filter=api_pb2.PodSandboxStatsFilter(label_selector={"app": "server"})), timeout=10).stats
    assert [p.attributes.id for p in only] == [server[0]]
    assert only[0].linux.network.default_interface.rx_bytes.value > 0


def test_list_container_stats_of_many_containers_matches_single_calls(rt: Stack, busybox: str):
    pod = run_pod(rt, "many")
    ids = [run_container(rt, pod, f"c{n}", busybox, ["sleep", "600"]) for n in range(50)]
    listed = {s.attributes.id: s for s in list_stats(rt, pod_sandbox_id=pod[0])}
    assert set(listed) == set(ids)
    for cid in ids[:10]:
        single = container_stats(rt, cid)
        assert listed[cid].attributes == single.attributes
        assert listed[cid].memory.usage_bytes.value > 0 and single.memory.usage_bytes.value > 0
        assert listed[cid].cpu.usage_core_nano_seconds.value <= single.cpu.usage_core_nano_seconds.value
        assert listed[cid].writable_layer.fs_id.mountpoint == single.writable_layer.fs_id.mountpoint


def test_metric_descriptors_and_pod_metrics(rt: Stack, busybox: str):
    pod = run_pod(rt, "metrics")
    cid = run_container(rt, pod, "m", busybox, ["sleep", "600"])
    exec_sync(rt, cid, ["sh", "-c", "wget -T 1 -q -O- http://127.0.0.1:1/ || true"])
    descriptors = rt.runtime.ListMetricDescriptors(api_pb2.ListMetricDescriptorsRequest(), timeout=10).descriptors
    by_name = {d.name: d for d in descriptors}
    for name in ("container_last_seen", "container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
                 "container_network_receive_bytes_total", "container_processes", "container_fs_usage_bytes",
                 "container_oom_events_total", "container_spec_memory_limit_bytes"):
        assert name in by_name
    assert list(by_name["container_memory_rss"].label_keys) == ["id", "image", "namespace", "pod", "container"]
    assert list(by_name["container_network_receive_bytes_total"].label_keys)[-1] == "interface"
    metrics = rt.runtime.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest(), timeout=10).pod_metrics
    [mine] = [m for m in metrics if m.pod_sandbox_id == pod[0]]
    pod_level = {(m.name, tuple(m.label_values)) for m in mine.metrics}
    assert ("container_network_receive_bytes_total", (pod[0], "", "stats", pod[1].metadata.name, "POD", "eth0")) \
        in pod_level
    [container] = mine.container_metrics
    values = {m.name: m for m in container.metrics}
    for name, metric in values.items():
        assert len(metric.label_values) == len(by_name[name].label_keys), name
    assert values["container_memory_usage_bytes"].value.value > 0
    assert values["container_processes"].value.value >= 1
    assert values["container_fs_usage_bytes"].metric_type == api_pb2.MetricType.GAUGE
    assert values["container_cpu_usage_seconds_total"].metric_type == api_pb2.MetricType.COUNTER
    assert list(values["container_memory_rss"].label_values) == [cid, busybox, "stats", pod[1].metadata.name, "m"]


# -- events --------------------------------------------------------------------------------------


def test_events_of_a_pods_life_reach_every_subscriber(rt: Stack, busybox: str, subscribers: list[EventClient]):
    pod = run_pod(rt, "events")
    quits = run_container(rt, pod, "quits", busybox, ["sh", "-c", "sleep 0.3; exit 3"])
    oom = run_container(rt, pod, "oom", busybox,
                        ["sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"],
                        memory_limit=32 * MiB)
    steady = run_container(rt, pod, "steady", busybox, ["sleep", "600"])
    assert wait_state(rt, quits, State.CONTAINER_EXITED).exit_code == 3
    assert wait_state(rt, oom, State.CONTAINER_EXITED).reason == "OOMKilled"
    rt.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=steady, timeout=0), timeout=30)
    rt.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=steady), timeout=30)
    rt.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod[0]), timeout=30)
    rt.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod[0]), timeout=30)
    full = ["CONTAINER_CREATED_EVENT", "CONTAINER_STARTED_EVENT", "CONTAINER_STOPPED_EVENT",
            "CONTAINER_DELETED_EVENT"]
    for client in subscribers:
        client.wait_for(pod[0], Event.CONTAINER_DELETED_EVENT)
        for cid in (quits, oom, steady):
            client.wait_for(cid, Event.CONTAINER_DELETED_EVENT)
            assert client.types_for(cid) == full
        assert client.types_for(pod[0]) == ["CONTAINER_CREATED_EVENT", "CONTAINER_STOPPED_EVENT",
                                            "CONTAINER_DELETED_EVENT"]
        created = client.wait_for(steady, Event.CONTAINER_CREATED_EVENT)
        assert created.pod_sandbox_status.id == pod[0]
        assert created.pod_sandbox_status.state == api_pb2.PodSandboxState.SANDBOX_READY
        assert created.pod_sandbox_status.metadata.name == pod[1].metadata.name
        own = [s for s in created.containers_statuses if s.id == steady]
        assert own and own[0].state == State.CONTAINER_CREATED and created.created_at > 0
        exited = client.wait_for(quits, Event.CONTAINER_STOPPED_EVENT)
        [st] = [s for s in exited.containers_statuses if s.id == quits]
        assert st.state == State.CONTAINER_EXITED and st.exit_code == 3 and st.reason == "Error"
        oomed = client.wait_for(oom, Event.CONTAINER_STOPPED_EVENT)
        [st] = [s for s in oomed.containers_statuses if s.id == oom]
        assert st.reason == "OOMKilled" and st.exit_code == 137
        removed = client.wait_for(steady, Event.CONTAINER_DELETED_EVENT)
        assert steady not in [s.id for s in removed.containers_statuses]
        pod_gone = client.wait_for(pod[0], Event.CONTAINER_DELETED_EVENT)
        assert pod_gone.pod_sandbox_status.state == api_pb2.PodSandboxState.SANDBOX_NOTREADY
        assert list(pod_gone.containers_statuses) == []
        assert client.error is None


def test_exit_while_runtimed_is_down_is_published_after_restart(rt: Stack, busybox: str,
                                                                subscribers: list[EventClient]):
    pod = run_pod(rt, "restart")
    cid = run_container(rt, pod, "victim", busybox, ["sleep", "600"])
    info = json.loads(rt.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid, verbose=True),
                                                 timeout=10).info["info"])
    os.kill(rt.pid("runtimed"), signal.SIGKILL)
    os.kill(info["pid"], signal.SIGKILL)  # dies while runtimed is away; conmon records the exit
    for client in subscribers:
        stopped = client.wait_for(cid, Event.CONTAINER_STOPPED_EVENT, timeout=60)
        [st] = [s for s in stopped.containers_statuses if s.id == cid]
        assert st.state == State.CONTAINER_EXITED and st.exit_code == 137
        assert client.error is None
    assert "derived_events_published" in rt.logs()


# -- checkpoint, runtime updates -------------------------------------------------------------------


def test_checkpoint(rt: Stack, busybox: str):
    pod = run_pod(rt, "ckpt")
    created = run_container(rt, pod, "idle", busybox, ["sleep", "600"], start=False)
    running = run_container(rt, pod, "busy", busybox, ["sleep", "600"])
    location = str(rt.dirs.base / f"ckpt-{secrets.token_hex(3)}.tar")
    with pytest.raises(grpc.RpcError) as err:
        rt.runtime.CheckpointContainer(api_pb2.CheckpointContainerRequest(container_id=created, location=location),
                                       timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not running" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        rt.runtime.CheckpointContainer(api_pb2.CheckpointContainerRequest(container_id=running, location="x.tar"),
                                       timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    usable, reason = asyncio.run(checkpoint.criu_usable())
    request = api_pb2.CheckpointContainerRequest(container_id=running, location=location, timeout=120)
    if not usable:
        with pytest.raises(grpc.RpcError) as err:
            rt.runtime.CheckpointContainer(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "CRIU" in err.value.details()
        assert not os.path.exists(location)
        pytest.skip(f"CRIU cannot run on this machine, no archive to check: {reason}")
    rt.runtime.CheckpointContainer(request, timeout=150)
    with tarfile.open(location) as tar:
        names = tar.getnames()
    assert "spec.dump" in names and "config.dump" in names and any(n.startswith("checkpoint/") for n in names)
    assert status(rt, running).state == State.CONTAINER_RUNNING


def test_runtime_config_cidr_and_pod_resources(rt: Stack):
    config = rt.runtime.RuntimeConfig(api_pb2.RuntimeConfigRequest(), timeout=10)
    assert config.linux.cgroup_driver == api_pb2.CgroupDriver.CGROUPFS
    rt.runtime.UpdateRuntimeConfig(api_pb2.UpdateRuntimeConfigRequest(runtime_config=api_pb2.RuntimeConfig(
        network_config=api_pb2.NetworkConfig(pod_cidr="10.244.7.0/24"))), timeout=10)
    saved = json.loads((rt.dirs.root / "netd" / "pod-cidr.json").read_text())
    assert saved["networks"] == ["10.244.7.0/24"]
    with pytest.raises(grpc.RpcError) as err:
        rt.runtime.UpdateRuntimeConfig(api_pb2.UpdateRuntimeConfigRequest(runtime_config=api_pb2.RuntimeConfig(
            network_config=api_pb2.NetworkConfig(pod_cidr="10.244.7.0/99"))), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    pod_id, pod = run_pod(rt, "resources")
    rt.runtime.UpdatePodSandboxResources(api_pb2.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod_id, resources=api_pb2.LinuxContainerResources(
            cpu_shares=256, memory_limit_in_bytes=128 * MiB)), timeout=10)
    parent = pod.linux.cgroup_parent.lstrip("/")
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    memory_file = Path("/sys/fs/cgroup", parent, "memory.max") if v2 else \
        Path("/sys/fs/cgroup/memory", parent, "memory.limit_in_bytes")
    assert int(memory_file.read_text()) == 128 * MiB
    with pytest.raises(grpc.RpcError) as err:
        rt.runtime.UpdatePodSandboxResources(api_pb2.UpdatePodSandboxResourcesRequest(
            pod_sandbox_id="0" * 64), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
