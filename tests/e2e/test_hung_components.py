"""Hung components: a CNI plugin or a runc that never answers.

Wrappers stand in for the bridge plugin and for runc (a runtime handler of
its own): they do the real work, or not, and then sleep when the test asks
them to. The call must fail with DEADLINE_EXCEEDED within its deadline, no
wrapper may be left running (nor any zombie of ours), and what the call left
must be cleaned up by the next one, leaving nothing behind.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.support.pods import bridge_stack, busybox_registry, leftovers, new_leftovers
from tests.support.stack import Stack

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

CGROUP_PARENT = f"/criopy-hung-{secrets.token_hex(3)}"
CNI_TIMEOUT = 3
CREATE_TIMEOUT = 3
HANDLER = "hangs"
SLEEP = str(50000 + secrets.randbelow(10000))  # what a hanging wrapper sleeps: its mark in /proc

# runc's subcommand is its first argument that is one; `hang-<subcommand>` makes it hang,
# before doing anything, or `hang-after-<subcommand>` once the real runc has done its work.
# It names itself otherwise than runc, so that runtimed runs `runc start` through it rather
# than opening runc's exec fifo itself (services/runtimed/exec_fifo.py).
RUNC_WRAPPER = """#!/bin/sh
if [ "$1" = --version ]; then /usr/bin/runc --version | sed '1s/^runc /runc-wrapper /'; exit 0; fi
for arg in "$@"; do
  case "$arg" in create|start|kill|delete|exec|state) sub=$arg; break;; esac
done
if [ -n "$sub" ] && [ -e "{dir}/hang-$sub" ]; then sleep {sleep}; exit 1; fi
if [ -n "$sub" ] && [ -e "{dir}/hang-after-$sub" ]; then /usr/bin/runc "$@"; sleep {sleep}; exit 1; fi
exec /usr/bin/runc "$@"
"""
# The bridge plugin makes the pod's veth and address, then hangs before it answers.
CNI_WRAPPER = """#!/bin/sh
if [ "$CNI_COMMAND" = ADD ] && [ -e "{dir}/hang-after-ADD" ]; then /usr/lib/cni/bridge >/dev/null; sleep {sleep}; exit 1; fi
exec /usr/lib/cni/bridge
"""


@dataclass
class World:
    stack: Stack
    image: str
    wrappers: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    wrappers = tmp_path_factory.mktemp("wrappers")
    (wrappers / "cni").mkdir()
    for path, text in ((wrappers / "runc", RUNC_WRAPPER), (wrappers / "cni" / "bridge", CNI_WRAPPER)):
        path.write_text(text.format(dir=wrappers, sleep=SLEEP))
        path.chmod(0o755)
    handler = f'{{runtime_path="{wrappers / "runc"}", container_create_timeout={CREATE_TIMEOUT}}}'
    with busybox_registry(tmp_path_factory.mktemp("hung-registry"), "hung/busybox",
                          cmd=["sh"], env=["PATH=/bin"]) as (registry, image), \
            bridge_stack("cph-", CGROUP_PARENT, "--set", f"crio.runtime.runtimes.{HANDLER}={handler}",
                         "--set", f"crio.network.plugin_dirs={json.dumps([str(wrappers / 'cni'), '/usr/lib/cni'])}",
                         "--set", f"crio.network.cni_timeout={CNI_TIMEOUT}", registry=registry) as stack:
        stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
        yield World(stack, image, wrappers)


def pod_config(name: str) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="hung", uid=secrets.token_hex(8)),
        hostname=name, linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=f"{CGROUP_PARENT}/{name}"))


def hanging_pod(world: World, name: str) -> tuple[str, api_pb2.CreateContainerRequest]:
    """A pod on the wrapped runc's handler, and the request that creates its container."""
    pod = pod_config(name)
    pod_id = world.stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod, runtime_handler=HANDLER),
                                               timeout=30).pod_sandbox_id
    config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="c"),
                                     image=api_pb2.ImageSpec(image=world.image), command=["sleep", "600"],
                                     log_path="c.log")
    return pod_id, api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)


def remove_pod(stack: Stack, pod_id: str) -> None:
    stack.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=30)
    stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=30)


def _stat(pid: str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def stragglers(world: World, timeout: float = 10.0) -> list[str]:
    """Wrappers still running, and zombies of crio-py's processes, once they had `timeout` to go."""
    ours = {str(world.stack.process.pid)} | {str(s["pid"]) for s in world.stack.status().values() if s.get("pid")}
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # A wrapper runs as `/bin/sh <wrapper> ...`; what it sleeps as `sleep <SLEEP>`.
            if args[:2] == [b"sleep", SLEEP.encode()] or any(a.startswith(bytes(world.wrappers)) for a in args[:2]):
                found.append(f"{pid} {b' '.join(args).decode(errors='replace')}")
            stat = _stat(pid)
            if stat and stat[0] == "Z" and stat[1] in ours:
                found.append(f"{pid} zombie of {stat[1]}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def timed(call, timeout: float) -> tuple[grpc.RpcError, float]:  # type: ignore[no-untyped-def]
    """The error a call fails with, and how long it took."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        call(timeout)
    return failed.value, time.monotonic() - started


@pytest.fixture
def hang(world: World) -> Iterator[callable]:  # type: ignore[valid-type]
    armed: list[Path] = []

    def arm(what: str) -> None:
        armed.append(world.wrappers / f"hang-{what}")
        armed[-1].touch()

    yield arm
    for path in armed:
        path.unlink(missing_ok=True)


def test_a_cni_add_that_never_answers(world: World, hang) -> None:  # type: ignore[no-untyped-def]
    stack, rt = world.stack, world.stack.runtime
    before = leftovers(stack, CGROUP_PARENT)
    pod = pod_config("cni")
    hang("after-ADD")
    error, took = timed(lambda t: rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=t), 20)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"timed out after {CNI_TIMEOUT}s" in error.details() and took < 20
    assert stragglers(world) == []
    # The veth and the address the plugin made before it hung are gone with the pod's network.
    assert new_leftovers(stack, CGROUP_PARENT, before, timeout=15) == {}

    (world.wrappers / "hang-after-ADD").unlink()
    pod_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=30).pod_sandbox_id
    remove_pod(stack, pod_id)
    assert new_leftovers(stack, CGROUP_PARENT, before, timeout=15) == {}


def test_a_runc_create_that_never_answers(world: World, hang) -> None:  # type: ignore[no-untyped-def]
    stack, rt = world.stack, world.stack.runtime
    before = leftovers(stack, CGROUP_PARENT)
    pod_id, request = hanging_pod(world, "create")
    hang("after-create")
    error, took = timed(lambda t: rt.CreateContainer(request, timeout=t), 20)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"not created within {CREATE_TIMEOUT}s" in error.details() and took < 20
    assert stragglers(world) == []
    assert rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers == []

    # The kubelet's retry makes it once runc answers again; the pod's removal leaves nothing.
    (world.wrappers / "hang-after-create").unlink()
    cid = rt.CreateContainer(request, timeout=30).container_id
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    remove_pod(stack, pod_id)
    assert new_leftovers(stack, CGROUP_PARENT, before, timeout=15) == {}


def test_a_start_whose_init_never_takes_its_go(world: World) -> None:
    """With runc itself, runtimed opens the exec fifo: an init that never opens its end (stopped here)
    makes the start fail at its deadline, and the wait ends with the call."""
    stack, rt = world.stack, world.stack.runtime
    before = leftovers(stack, CGROUP_PARENT)
    pod = pod_config("stopped-init")
    pod_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=30).pod_sandbox_id
    config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="c"),
                                     image=api_pb2.ImageSpec(image=world.image), command=["sleep", "600"])
    cid = rt.CreateContainer(api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod),
                             timeout=30).container_id
    state = subprocess.run(["runc", "--root", str(stack.dirs.root / "runtimed" / "runc"), "state", cid],
                           capture_output=True, check=True)
    os.kill(json.loads(state.stdout)["pid"], signal.SIGSTOP)
    error, took = timed(lambda t: rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=t), 5)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and took < 5 + 1
    # runtimed gave up with the call: the removal does not wait for the start's own time limit.
    started = time.monotonic()
    rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=10)
    assert time.monotonic() - started < 10
    remove_pod(stack, pod_id)
    assert new_leftovers(stack, CGROUP_PARENT, before, timeout=15) == {}


def test_a_runc_start_that_never_answers(world: World, hang) -> None:  # type: ignore[no-untyped-def]
    stack, rt = world.stack, world.stack.runtime
    before = leftovers(stack, CGROUP_PARENT)
    pod_id, request = hanging_pod(world, "start")
    cid = rt.CreateContainer(request, timeout=30).container_id
    hang("start")
    error, took = timed(lambda t: rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=t), 5)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and took < 5 + 1
    assert stragglers(world) == []
    # Never started, it is removed as a created container is.
    rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    remove_pod(stack, pod_id)
    assert new_leftovers(stack, CGROUP_PARENT, before, timeout=15) == {}
