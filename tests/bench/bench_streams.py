"""Streaming throughput: 20 MiB each way through exec and port-forward, with the real crictl.

crio-py: `crictl exec` of a `dd` writing 20 MiB (out of the container) and of
one reading 20 MiB from crictl's stdin (into it), each timed as a whole
command, as an operator sees it; `crictl port-forward` over SPDY and over
WebSocket to two `nc` servers in the pod running the same `dd`s. (`dd` with
64 KiB blocks: busybox's `head -c` and `wc -c` are slower than the streams.)
The floor, in the same run: `runc exec` with its stdio piped straight to us,
and plain TCP to the pod's address over the bridge. Reports the median MB/s
(1 MB = 10^6 bytes) of a few runs of each.

crictl comes from $CRICTL (`make bench` passes ../shared/tools/crictl).
"""

from __future__ import annotations

import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from cri_api.v1 import api_pb2

from tests.support.pods import bridge_stack, busybox_registry
from tests.support.stack import REPO, Stack

BLOCK = 65536
SIZE = 320 * BLOCK  # 20 MiB
# What the container runs: writing SIZE bytes; reading them (reporting its block count).
WRITER = ["sh", "-c", f"dd if=/dev/zero bs={BLOCK} count={SIZE // BLOCK} 2>/dev/null"]
READER = ["sh", "-c", f"dd bs={BLOCK} iflag=fullblock of=/dev/null 2>&1"]
READ_ALL = f"{SIZE // BLOCK}+0 records in".encode()
RUNS = 5
OUT_PORT = 9101
IN_PORT = 9102
DEFAULT_CRICTL = REPO.parent / "shared" / "tools" / "crictl"


def mb_per_s(seconds: float) -> float:
    return SIZE / 1e6 / seconds


def median_rate(fn: Callable[[], float]) -> float:
    fn()  # warm up: first connections, page cache
    return mb_per_s(statistics.median(fn() for _ in range(RUNS)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- transfers ------------------------------------------------------------------


def receive_all(host: str, port: int) -> float:
    """Seconds to read everything the server at host:port sends (checked to be SIZE bytes)."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=60) as s:
        got = 0
        while chunk := s.recv(1 << 20):
            got += len(chunk)
    elapsed = time.perf_counter() - started
    if got != SIZE:
        raise RuntimeError(f"received {got} bytes from port {port}, expected {SIZE}")
    return elapsed


def send_all(host: str, port: int) -> float:
    """Seconds to send SIZE bytes to a READER server and read its count back."""
    payload = b"\0" * SIZE
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    elapsed = time.perf_counter() - started
    if READ_ALL not in reply:
        raise RuntimeError(f"the pod read {reply!r}, expected {SIZE} bytes")
    return elapsed


def timed_run(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return time.perf_counter() - started


def run_out(args: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or len(result.stdout) != SIZE:
        raise RuntimeError(f"{args[0]} exited {result.returncode} with {len(result.stdout)} bytes: "
                           f"{result.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def run_in(args: list[str]) -> float:
    payload = b"\0" * SIZE
    started = time.perf_counter()
    result = subprocess.run(args, input=payload, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or READ_ALL not in result.stdout:
        raise RuntimeError(f"{args[0]} exited {result.returncode}, output {result.stdout[-200:]!r}: "
                           f"{result.stderr.decode(errors='replace')[-500:]}")
    return elapsed


# -- the parts --------------------------------------------------------------------


class Pod:
    def __init__(self, stack: Stack, image: str, cgroup_parent: str) -> None:
        self.stack = stack
        rt = stack.runtime
        self.config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="streams", namespace="bench", uid=secrets.token_hex(8)),
            hostname="streams", linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=f"{cgroup_parent}/streams"))
        self.id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=self.config), timeout=60).pod_sandbox_id
        self.worker = self.container(image, "worker", ["sleep", "100000"])
        self.container(image, "sender", ["nc", "-ll", "-p", str(OUT_PORT), "-e", *WRITER])
        self.container(image, "reader", ["nc", "-ll", "-p", str(IN_PORT), "-e", *READER])
        status = rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=self.id), timeout=30)
        self.ip = status.status.network.ip

    def container(self, image: str, name: str, command: list[str]) -> str:
        rt = self.stack.runtime
        cfg = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=name),
                                      image=api_pb2.ImageSpec(image=image), command=command, log_path=f"{name}.log")
        cid = rt.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=self.id, config=cfg, sandbox_config=self.config), timeout=60).container_id
        rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=60)
        return cid


def wait_listening(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def measure(crictl: list[str], stack: Stack, pod: Pod) -> list[str]:
    runc = ["runc", "--root", str(stack.dirs.root / "runtimed" / "runc"), "exec"]
    lines = []
    out_cmd, in_cmd = WRITER, READER
    rates = {
        "exec out, crictl exec": median_rate(lambda: run_out([*crictl, "exec", pod.worker, *out_cmd])),
        "exec in, crictl exec -i": median_rate(lambda: run_in([*crictl, "exec", "-i", pod.worker, *in_cmd])),
        "exec out, floor (runc exec)": median_rate(lambda: run_out([*runc, pod.worker, *out_cmd])),
        "exec in, floor (runc exec)": median_rate(lambda: run_in([*runc, pod.worker, *in_cmd])),
    }
    wait_listening(pod.ip, OUT_PORT)
    wait_listening(pod.ip, IN_PORT)
    for transport in ("spdy", "websocket"):
        out_local, in_local = free_port(), free_port()
        forward = subprocess.Popen(
            [*crictl, "port-forward", "--transport", transport, pod.id, f"{out_local}:{OUT_PORT}",
             f"{in_local}:{IN_PORT}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening("127.0.0.1", out_local)
            wait_listening("127.0.0.1", in_local)
            rates[f"port-forward out, crictl {transport}"] = median_rate(lambda: receive_all("127.0.0.1", out_local))
            rates[f"port-forward in, crictl {transport}"] = median_rate(lambda: send_all("127.0.0.1", in_local))
        finally:
            forward.terminate()
            forward.wait()
    rates["port-forward out, floor (TCP to the pod)"] = median_rate(lambda: receive_all(pod.ip, OUT_PORT))
    rates["port-forward in, floor (TCP to the pod)"] = median_rate(lambda: send_all(pod.ip, IN_PORT))
    for name, rate in rates.items():
        lines.append(f"{name:<44} {rate:8.1f} MB/s  ({SIZE / 1e6 / rate:.3f} s for 20 MiB)")
    # What every crictl exec pays before a byte moves: crictl's start, Exec, the upgrade, runc exec.
    fixed = statistics.median(timed_run([*crictl, "exec", pod.worker, "true"]) for _ in range(RUNS))
    lines.append(f"{'crictl exec of `true`, for comparison':<44} {fixed:8.3f} s")
    return lines


def main() -> None:
    binary = os.environ.get("CRICTL") or str(DEFAULT_CRICTL)
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"crictl not found at {binary}; set CRICTL to the crictl binary")
    cgroup_parent = f"/criopy-bench-{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as work, \
            busybox_registry(Path(work), "bench/busybox", cmd=["sh"]) as (registry, image), \
            bridge_stack("cbs-", cgroup_parent, registry=registry) as stack:
        stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
        endpoint = f"unix://{stack.dirs.socket}"
        crictl = [binary, "--config", "/dev/null", "-r", endpoint, "-i", endpoint, "--timeout", "60s"]
        pod = Pod(stack, image, cgroup_parent)
        sys.stdout.write("\n".join(measure(crictl, stack, pod)) + "\n")


if __name__ == "__main__":
    main()
