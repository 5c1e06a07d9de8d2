"""Per-call cost of the calls the kubelet makes every second, and the memory of the processes.

Starts crio-py (the supervisor and its five services) with a bridge CNI
network, pulls a busybox image from a local docker-registry, and times, with
a Python gRPC client on the CRI socket, one call after another: Version,
Status, ListPodSandbox, ListContainers, PodSandboxStatus, ContainerStatus,
ListImages, ImageStatus and ImageFsInfo. First with 3 pods, then with 100,
each pod running one `sleep` container (pods are started in parallel).
Prints p50 and p99 of each, beside the floor (the same answers replayed
from memory by a bare Python gRPC server, call_floor.py) and the target, and
the RSS and PSS of each process (from /proc/<pid>/smaps_rollup) at idle and
after the load, the total PSS next to its targets. PSS splits a page among
the processes that map it, other programs' too: a shared library another
process on the machine maps (grpc's, Python's) counts for less here.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from cri_api.v1 import api_pb2, api_pb2_grpc

from tests.bench.bench_pods import percentile
from tests.bench.call_floor import floor_server
from tests.support.pods import bridge_stack, busybox_registry
from tests.support.stack import Stack

FEW, MANY = 3, 100
# Issue 15: PSS of all processes together (supervisor, fork server and the five services), in MiB.
PSS_TARGET_IDLE, PSS_TARGET_LOADED = 100, 138
CALLS = 400  # per method with few pods
CALLS_MANY = 200  # per method with many pods (List* grow with them)
WARMUP = 20
PARALLEL_STARTS = 8
IMAGE_CALLS = ("ListImages", "ImageStatus", "ImageFsInfo")
# p50 targets with MANY pods, in ms: lists, and the other reads answered from the read model.
TARGETS = {"ListPodSandbox": 0.6, "ListContainers": 0.6, **{name: 0.45 for name in (
    "Version", "Status", "PodSandboxStatus", "ContainerStatus", "ListImages", "ImageStatus")}}


def _start_pod(stack: Stack, image: str, cgroup_parent: str) -> tuple[str, str]:
    name = f"bench-{secrets.token_hex(4)}"
    pod = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="bench", uid=secrets.token_hex(8)),
        hostname=name, labels={"app": "bench"},
        linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=f"{cgroup_parent}/{name}"))
    rt = stack.runtime
    pod_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=120).pod_sandbox_id
    container = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="sleep"), image=api_pb2.ImageSpec(image=image),
        command=["sleep", "3600"], log_path="sleep.log", labels={"app": "bench"})
    cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=container, sandbox_config=pod), timeout=120).container_id
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=120)
    return pod_id, cid


def _start_pods(stack: Stack, image: str, cgroup_parent: str, count: int) -> list[tuple[str, str]]:
    with concurrent.futures.ThreadPoolExecutor(PARALLEL_STARTS) as pool:
        futures = [pool.submit(_start_pod, stack, image, cgroup_parent) for _ in range(count)]
        return [f.result() for f in futures]


def _remove_pods(stack: Stack) -> None:
    pods = stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items
    with concurrent.futures.ThreadPoolExecutor(PARALLEL_STARTS) as pool:
        for f in [pool.submit(stack.runtime.RemovePodSandbox,
                              api_pb2.RemovePodSandboxRequest(pod_sandbox_id=p.id), timeout=120) for p in pods]:
            f.result()


def _calls(rt: api_pb2_grpc.RuntimeServiceStub, im: api_pb2_grpc.ImageServiceStub,
           image: str, pod_id: str, container_id: str) -> dict[str, Callable[[], object]]:
    return {
        "Version": lambda: rt.Version(api_pb2.VersionRequest(), timeout=10),
        "Status": lambda: rt.Status(api_pb2.StatusRequest(), timeout=10),
        "ListPodSandbox": lambda: rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10),
        "ListContainers": lambda: rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10),
        "PodSandboxStatus": lambda: rt.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=10),
        "ContainerStatus": lambda: rt.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id=container_id), timeout=10),
        "ListImages": lambda: im.ListImages(api_pb2.ListImagesRequest(), timeout=10),
        "ImageStatus": lambda: im.ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image)), timeout=10),
        "ImageFsInfo": lambda: im.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10),
    }


ROUND = 20  # calls of one method in a row, before the other server's turn


def _measure(calls: dict[str, Callable[[], object]], floor_calls: dict[str, Callable[[], object]],
             count: int) -> dict[str, tuple[float, float, float]]:
    """p50 and p99 of each call and the floor's p50, in milliseconds. crio-py and the floor take turns
    in short rounds, so that what the machine does meanwhile weighs on both alike."""
    out = {}
    for name, call in calls.items():
        times: dict[str, list[float]] = {"crio-py": [], "floor": []}
        for _ in range(WARMUP):
            call()
            floor_calls[name]()
        while len(times["crio-py"]) < count:
            for side, fn in (("crio-py", call), ("floor", floor_calls[name])):
                for _ in range(ROUND):
                    started = time.perf_counter()
                    fn()
                    times[side].append(time.perf_counter() - started)
        out[name] = (percentile(times["crio-py"], 50) * 1000, percentile(times["crio-py"], 99) * 1000,
                     percentile(times["floor"], 50) * 1000)
    return out


def _measure_with_floor(calls: dict[str, Callable[[], object]], socket: Path, image: str, pod_id: str,
                        container_id: str, count: int) -> dict[str, tuple[float, float, float]]:
    """The calls, and the same against the floor server, which replays crio-py's answers to them."""
    answers = {}
    for name, call in calls.items():
        service = "ImageService" if name in IMAGE_CALLS else "RuntimeService"
        answers[f"/runtime.v1.{service}/{name}"] = call().SerializeToString()  # type: ignore[attr-defined]
    with floor_server(socket, answers) as channel:
        floor_calls = _calls(api_pb2_grpc.RuntimeServiceStub(channel), api_pb2_grpc.ImageServiceStub(channel),
                             image, pod_id, container_id)
        return _measure(calls, floor_calls, count)


def _memory(pid: int) -> tuple[int, int]:
    """RSS and PSS of a process, in kB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                fields[key] = int(rest.split()[0])
    return fields["Rss"], fields["Pss"]


def _processes(stack: Stack) -> dict[str, int]:
    """The supervisor, its fork server when it has one, and the five services."""
    pids = {"supervisor": stack.process.pid}
    services = {name: int(s["pid"]) for name, s in stack.status().items()}
    with open(f"/proc/{stack.process.pid}/task/{stack.process.pid}/children") as f:
        others = [int(pid) for pid in f.read().split() if int(pid) not in services.values()]
    pids.update({"forkserver": pid for pid in others})
    pids.update(services)
    return pids


def _memory_table(idle: dict[str, tuple[int, int]], loaded: dict[str, tuple[int, int]]) -> list[str]:
    lines = [f"{'process (MiB)':<14}{'RSS idle':>10}{'PSS idle':>10}{'RSS load':>10}{'PSS load':>10}"]
    for name in idle:
        (ri, pi), (rl, pl) = idle[name], loaded.get(name, (0, 0))
        lines.append(f"{name:<14}{ri / 1024:>10.1f}{pi / 1024:>10.1f}{rl / 1024:>10.1f}{pl / 1024:>10.1f}")
    total = [sum(v[i] for v in d.values()) / 1024 for d in (idle, loaded) for i in (0, 1)]
    lines.append(f"{'total':<14}" + "".join(f"{t:>10.1f}" for t in total))
    lines.append(f"{'target':<14}{'':>10}{f'<= {PSS_TARGET_IDLE}':>10}{'':>10}{f'<= {PSS_TARGET_LOADED}':>10}"
                 f"  PSS total: idle {'met' if total[1] <= PSS_TARGET_IDLE else 'MISSED'}, "
                 f"after load {'met' if total[3] <= PSS_TARGET_LOADED else 'MISSED'}")
    return lines


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-calls-"))
    cgroup_parent = f"/criopy-bench-{secrets.token_hex(3)}"
    try:
        with busybox_registry(work / "registry", "bench/busybox") as (registry, image), \
                bridge_stack("cpc-", cgroup_parent, registry=registry) as stack:
            pids = _processes(stack)
            idle = {name: _memory(pid) for name, pid in pids.items()}
            stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
            started = time.perf_counter()
            pods = _start_pods(stack, image, cgroup_parent, FEW)
            calls = _calls(stack.runtime, stack.images, image, *pods[0])
            few = _measure_with_floor(calls, work / "floor.sock", image, *pods[0], CALLS)
            pods += _start_pods(stack, image, cgroup_parent, MANY - FEW)
            setup_s = time.perf_counter() - started
            many = _measure_with_floor(calls, work / "floor.sock", image, *pods[0], CALLS_MANY)
            loaded = {name: _memory(pid) for name, pid in pids.items()}
            _remove_pods(stack)
        lines = [f"{MANY} pods with one container each started in {setup_s:.1f} s ({PARALLEL_STARTS} at a time)",
                 f"{'call (ms)':<18}{f'p50 {FEW}':>9}{f'p99 {FEW}':>9}{'floor':>7}"
                 f"{f'p50 {MANY}':>9}{f'p99 {MANY}':>9}{'floor':>7}{'target':>8}"]
        for name, (p50, p99, floor) in few.items():
            m50, m99, many_floor = many[name]
            target = f"{TARGETS[name]:>8.2f}" if name in TARGETS else f"{'-':>8}"
            lines.append(f"{name:<18}{p50:>9.2f}{p99:>9.2f}{floor:>7.2f}"
                         f"{m50:>9.2f}{m99:>9.2f}{many_floor:>7.2f}{target}")
        lines += _memory_table(idle, loaded)
        sys.stdout.write("\n".join(lines) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
