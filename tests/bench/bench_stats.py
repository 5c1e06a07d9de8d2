"""Stats latency: ListContainerStats over 100 running containers, through the real CRI socket.

Starts crio-py (all five services) with a loopback-only CNI network, runs one
pod with 100 `sleep` containers, and times ListContainerStats (cgroups from
runtimed, writable layers from storaged), 100 single ContainerStats calls, and
ListPodSandboxStats. Prints the medians.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from cri_api.v1 import api_pb2

from shared import mountinfo, mounts
from tests.support import images
from tests.support.registry import launch_registry
from tests.support.stack import Dirs, Stack, remove_dirs, short_tempdir, start_stack

CONTAINERS = 100
RUNS = 15


def _median_ms(fn, runs: int = RUNS) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _populate(stack: Stack, image: str, parent: str) -> str:
    pod = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="bench", namespace="bench", uid=secrets.token_hex(8)),
        linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=parent))
    pod_id = stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=60).pod_sandbox_id
    for n in range(CONTAINERS):
        config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=f"c{n}"),
                                         image=api_pb2.ImageSpec(image=image), command=["sleep", "3600"],
                                         log_path=f"c{n}.log")
        cid = stack.runtime.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod), timeout=60).container_id
        stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    return pod_id


def _cleanup(stack: Stack, dirs: Dirs, parent: str) -> None:
    try:
        for pod in stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items:
            stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=300)
    finally:
        stack.stop()
        runc_root = dirs.root / "runtimed" / "runc"
        if runc_root.is_dir():
            for cid in os.listdir(runc_root):
                subprocess.run(["runc", "--root", str(runc_root), "delete", "-f", cid], capture_output=True)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if cmd.startswith(b"/usr/bin/conmon") and str(dirs.base).encode() in cmd:
                    os.kill(int(entry), signal.SIGKILL)
        for m in sorted(mountinfo.current(), key=lambda m: len(m.mount_point), reverse=True):
            if m.mount_point.startswith(str(dirs.base) + "/"):
                mounts.unmount(m.mount_point)
        for top in Path("/sys/fs/cgroup").glob(f"*{parent}"):
            for d in sorted(top.rglob("*"), key=lambda p: len(str(p)), reverse=True):
                if d.is_dir():
                    d.rmdir()
            top.rmdir()
        remove_dirs(dirs)


def main() -> None:
    parent = f"/criopy-bench-{secrets.token_hex(3)}"
    registry_dir = Path(tempfile.mkdtemp(prefix="bench-reg-"))
    registry = launch_registry(registry_dir)
    dirs = Dirs(short_tempdir("cpb-")).make()
    (dirs.cni / "10-bench.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "bench", "plugins": [{"type": "loopback"}]}))
    stack = start_stack(dirs, "--set", f"crio.image.insecure_registries={json.dumps([registry.host])}")
    try:
        images.push_busybox_image(registry, "bench/busybox", "latest", cmd=["sh"], env=["PATH=/bin"])
        image = f"{registry.host}/bench/busybox:latest"
        stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=60)
        started = time.perf_counter()
        _populate(stack, image, parent)
        setup_s = time.perf_counter() - started
        listed = stack.runtime.ListContainerStats(api_pb2.ListContainerStatsRequest(), timeout=30).stats
        assert len(listed) == CONTAINERS and all(s.memory.usage_bytes.value for s in listed)
        ids = [s.attributes.id for s in listed]
        list_ms = _median_ms(lambda: stack.runtime.ListContainerStats(api_pb2.ListContainerStatsRequest(),
                                                                      timeout=30))
        singles_ms = _median_ms(lambda: [stack.runtime.ContainerStats(
            api_pb2.ContainerStatsRequest(container_id=i), timeout=30) for i in ids], runs=3)
        pod_ms = _median_ms(lambda: stack.runtime.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(),
                                                                      timeout=30))
        status_ms = _median_ms(lambda: stack.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=30))
        print(f"{CONTAINERS} running containers (created and started in {setup_s:.1f} s)")
        print(f"ListContainerStats:           {list_ms:8.1f} ms (median of {RUNS})")
        print(f"ContainerStats x{CONTAINERS}:          {singles_ms:8.1f} ms ({singles_ms / CONTAINERS:.2f} ms each)")
        print(f"ListPodSandboxStats:          {pod_ms:8.1f} ms")
        print(f"ListContainers (reference):   {status_ms:8.1f} ms")
    finally:
        try:
            _cleanup(stack, dirs, parent)
        finally:
            registry.stop()
            shutil.rmtree(registry_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
