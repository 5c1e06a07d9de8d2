"""Pod start and teardown through crio-py, next to the floor of the same steps done by hand.

crio-py: RunPodSandbox + CreateContainer + StartContainer of a busybox
container (bridge CNI), then StopPodSandbox + RemovePodSandbox; one at a time
and ten at a time. The floor, measured in the same run: `ip netns add`, the
CNI bridge plugin, an overlay mount and `runc run -d`, then their undoing.
Reports median and p99 of each.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

from cri_api.v1 import api_pb2

from tests.support import images
from tests.support.registry import launch_registry
from tests.support.stack import Dirs, Stack, remove_dirs, short_tempdir, start_stack

SEQUENTIAL = 20
CONCURRENT = 10
ROUNDS = 3
CNI_BIN = "/usr/lib/cni"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def report(name: str, values: list[float]) -> str:
    return (f"{name:<34} n={len(values):>3}  median {statistics.median(values) * 1000:8.1f} ms"
            f"  p99 {percentile(values, 99) * 1000:8.1f} ms")


def timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# -- crio-py ------------------------------------------------------------------


class CrioPods:
    """Pods of one `sleep` container through the CRI; `calls` collects each CRI call's duration by method."""

    def __init__(self, stack: Stack, image: str, cgroup_parent: str) -> None:
        self.stack = stack
        self.image = image
        self.cgroup_parent = cgroup_parent
        self.calls: dict[str, list[float]] = defaultdict(list)
        # Each sequential start's RunPodSandbox, and its CreateContainer + StartContainer, in seconds.
        self.run_times: list[float] = []
        self.create_times: list[float] = []

    def _timed(self, method: str, request: object, timeout: float = 60) -> object:
        started = time.perf_counter()
        try:
            return getattr(self.stack.runtime, method)(request, timeout=timeout)
        finally:
            self.calls[method].append(time.perf_counter() - started)

    def start(self) -> str:
        name = f"bench-{secrets.token_hex(4)}"
        pod = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, namespace="bench", uid=secrets.token_hex(8)),
            hostname=name, linux=api_pb2.LinuxPodSandboxConfig(
                cgroup_parent=f"{self.cgroup_parent}/{name}",
                # As the kubelet sends it for a pod that does not share its process namespace.
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NamespaceMode.CONTAINER))))
        pod_id = self._timed("RunPodSandbox", api_pb2.RunPodSandboxRequest(config=pod)).pod_sandbox_id
        container = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="sleep"), image=api_pb2.ImageSpec(image=self.image),
            command=["sleep", "3600"], log_path="sleep.log")
        cid = self._timed("CreateContainer", api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=container, sandbox_config=pod)).container_id
        self._timed("StartContainer", api_pb2.StartContainerRequest(container_id=cid))
        self.run_times.append(self.calls["RunPodSandbox"][-1])
        self.create_times.append(self.calls["CreateContainer"][-1] + self.calls["StartContainer"][-1])
        return pod_id

    def stop(self, pod_id: str) -> None:
        self._timed("StopPodSandbox", api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        self._timed("RemovePodSandbox", api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


# -- the floor: the same steps without crio-py ---------------------------------


class FloorPods:
    def __init__(self, work: Path, conflist: dict) -> None:
        self.work = work
        self.rootfs = work / "lower"
        (self.rootfs / "bin").mkdir(parents=True)
        shutil.copy("/bin/busybox", self.rootfs / "bin" / "busybox")
        for applet in ("sh", "sleep"):
            os.symlink("busybox", self.rootfs / "bin" / applet)
        for d in ("proc", "sys", "dev", "tmp", "etc"):
            (self.rootfs / d).mkdir()
        self.net = {**conflist["plugins"][0], "cniVersion": conflist["cniVersion"], "name": conflist["name"]}
        self.runc_root = work / "runc"
        # Each sequential start's container part (overlay mount, spec, `runc run -d`), in seconds:
        # the floor under crio-py's CreateContainer + StartContainer.
        self.create_times: list[float] = []

    def _cni(self, command: str, pod: str, netns: str) -> None:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": pod, "CNI_NETNS": netns,
               "CNI_IFNAME": "eth0", "CNI_PATH": CNI_BIN, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        subprocess.run([f"{CNI_BIN}/bridge"], input=json.dumps(self.net).encode(), env=env,
                       check=True, capture_output=True)

    def start(self) -> str:
        pod = f"floor{secrets.token_hex(4)}"
        bundle = self.work / pod
        for d in ("upper", "work", "merged"):
            (bundle / d).mkdir(parents=True)
        subprocess.run(["ip", "netns", "add", pod], check=True)
        self._cni("ADD", pod, f"/var/run/netns/{pod}")
        container_started = time.perf_counter()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.rootfs},upperdir={bundle}/upper,workdir={bundle}/work",
                        str(bundle / "merged")], check=True)
        subprocess.run(["runc", "spec", "-b", str(bundle)], check=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["root"] = {"path": str(bundle / "merged"), "readonly": False}
        spec["process"]["terminal"] = False
        spec["process"]["args"] = ["sleep", "3600"]
        for ns in spec["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = f"/var/run/netns/{pod}"
        (bundle / "config.json").write_text(json.dumps(spec))
        subprocess.run(["runc", "--root", str(self.runc_root), "run", "-d", "-b", str(bundle), pod],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.create_times.append(time.perf_counter() - container_started)
        return pod

    def stop(self, pod: str) -> None:
        bundle = self.work / pod
        subprocess.run(["runc", "--root", str(self.runc_root), "delete", "-f", pod], check=True)
        subprocess.run(["umount", str(bundle / "merged")], check=True)
        self._cni("DEL", pod, f"/var/run/netns/{pod}")
        subprocess.run(["ip", "netns", "del", pod], check=True)
        shutil.rmtree(bundle)


# -- measuring ----------------------------------------------------------------


def measure(name: str, pods: CrioPods | FloorPods) -> list[str]:
    starts, stops = [], []
    for _ in range(SEQUENTIAL):
        pod: list[str] = []
        starts.append(timed(lambda: pod.append(pods.start())))
        stops.append(timed(lambda: pods.stop(pod[0])))
    lines = [report(f"{name} start, one at a time", starts), report(f"{name} teardown, one at a time", stops)]
    if isinstance(pods, CrioPods):
        lines += [report("  RunPodSandbox, one at a time", pods.run_times),
                  report("  Create+StartContainer, one at a time", pods.create_times)]
    else:
        lines += [report("  container (overlay, spec, runc run -d), one at a time", pods.create_times)]
    starts, stops = [], []
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
        for _ in range(ROUNDS):
            futures = [pool.submit(lambda: (lambda t0: (pods.start(), time.perf_counter() - t0))(time.perf_counter()))
                       for _ in range(CONCURRENT)]
            started = [f.result() for f in futures]
            starts += [t for _, t in started]
            futures = [pool.submit(timed, lambda p=p: pods.stop(p)) for p, _ in started]
            stops += [f.result() for f in futures]
    lines += [report(f"{name} start, {CONCURRENT} at a time", starts),
              report(f"{name} teardown, {CONCURRENT} at a time", stops)]
    return lines


@contextlib.contextmanager
def bench_stack() -> Iterator[tuple[CrioPods, Path, dict]]:
    """crio-py with a bridge network of its own and a busybox image pulled; yields its pods, a work
    directory and the network's configuration list. Everything is removed on the way out."""
    work = Path(tempfile.mkdtemp(prefix="bench-pods-"))
    registry = launch_registry(work / "registry")
    dirs = Dirs(short_tempdir("cpb-")).make()
    bridge = f"cpb{secrets.token_hex(3)}"
    conflist = {"cniVersion": "1.0.0", "name": "criopy-bench",
                "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": True,
                             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.234.0.0/16"}]],
                                      "dataDir": str(work / "ipam")}},
                            {"type": "loopback"}]}
    (dirs.cni / "10-bench.conflist").write_text(json.dumps(conflist))
    cgroup_parent = f"/criopy-bench-{secrets.token_hex(3)}"
    stack = None
    try:
        images.push_busybox_image(registry, "bench/busybox", "latest")
        image = f"{registry.host}/bench/busybox:latest"
        stack = start_stack(dirs, "--set", f"crio.image.insecure_registries={json.dumps([registry.host])}")
        stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
        yield CrioPods(stack, image, cgroup_parent), work, conflist
    finally:
        if stack is not None:
            stack.stop()
        registry.stop()
        remove_dirs(dirs)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        for top in Path("/sys/fs/cgroup").glob(f"*{cgroup_parent}"):
            for d in sorted(top.rglob("*"), key=lambda p: len(str(p)), reverse=True):
                if d.is_dir():
                    d.rmdir()
            top.rmdir()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    with bench_stack() as (pods, work, conflist):
        lines = measure("crio-py", pods)
        lines += measure("floor (netns+CNI+overlay+runc)", FloorPods(work / "floor", conflist))
    sys.stdout.write("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
