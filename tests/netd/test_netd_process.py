"""netd as a real process on the bus, holding only its declared capabilities, and NetworkReady via the CRI."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2

from shared.bus.client import BusClient
from tests.netd.netd_env import NetEnv
from tests.netd.netd_helpers import connect, listener
from tests.support.stack import Dirs, remove_dirs, root_as_frontend, short_tempdir, start_stack

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


class NetdProcess:
    """`criopy service netd` with the test's configuration, and a bus client to it."""

    def __init__(self, net_env: NetEnv) -> None:
        self.net_env = net_env
        # Bus socket paths must stay short: the run dir lives in a short temp dir.
        self.runroot = short_tempdir("cpnetd-")
        net_env.config.crio.runroot = str(self.runroot)
        root_as_frontend(net_env.config)
        self.config_file = net_env.root / "criopy.conf"
        self.config_file.write_text(net_env.config.to_toml())
        self.log_path = net_env.root / "netd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.client: BusClient | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "--config", str(self.config_file),
                 "--config-dir", str(self.net_env.root / "no-dropins"), "--log-format", "json",
                 "service", "netd"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.client = BusClient.for_service(self.net_env.config, "netd")
        self.client.connect()

    async def call(self, method: str, timeout: float = 30.0, **params):
        assert self.client is not None
        return await self.client.call(method, deadline=time.time() + timeout, **params)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                await asyncio.to_thread(self.process.wait, 30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
async def netd_process(net_env: NetEnv):
    proc = NetdProcess(net_env)
    try:
        yield proc
    finally:
        await proc.stop()
        shutil.rmtree(proc.runroot, ignore_errors=True)


async def test_netd_process_attaches_pods_with_its_capabilities(net_env: NetEnv, netd_process: NetdProcess) -> None:
    netd_process.start()
    health = await netd_process.call("health")
    assert health["service"] == "netd" and health["ready"] is True
    assert set(health["capabilities"]) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_NET_RAW"}
    status = open(f"/proc/{health['pid']}/status").read()
    bounding = next(line for line in status.splitlines() if line.startswith("CapBnd:")).split()[1]
    assert int(bounding, 16) == (1 << 12) | (1 << 13) | (1 << 21)  # NET_ADMIN, NET_RAW, SYS_ADMIN
    assert health["network_ready"] is False
    assert "no CNI configuration file" in health["network_message"]

    net_env.write_conflist()
    health = await netd_process.call("health")
    assert health["network_ready"] is True, health

    host_port = 33000 + net_env.index
    a = await netd_process.call("attach", pod_id="proc-a", pod_name="a", pod_namespace="ns", pod_uid="ua",
                                port_mappings=[{"container_port": 8080, "host_port": host_port}])
    b = await netd_process.call("attach", pod_id="proc-b", pod_name="b", pod_namespace="ns", pod_uid="ub")
    assert a["ips"] != b["ips"]
    async with listener(a["netns_path"], "0.0.0.0", 8080):
        assert await connect(b["netns_path"], a["ips"][0], 8080) == f"hello from pod to {b['ips'][0]}"
        assert await connect(None, "127.0.0.1", host_port) == f"hello from pod to 10.233.{net_env.index}.1"

    # Killed and started again: the pods are still known, DEL works from the cache.
    await netd_process.stop(signal.SIGKILL)
    netd_process.start()
    assert (await netd_process.call("pod_network", pod_id="proc-a"))["ips"] == a["ips"]
    for pod in ("proc-a", "proc-b"):
        assert (await netd_process.call("detach", pod_id=pod))["detached"] is True
    assert (await netd_process.call("detach", pod_id="proc-a"))["detached"] is False
    inv = net_env.inventory()
    assert inv["netns"] == [] and inv["veths"] == [] and inv["ipam"] == [] and inv["rules"] == []


def _network_ready(stack) -> api_pb2.RuntimeCondition:
    response = stack.runtime.Status(api_pb2.StatusRequest(), timeout=5)
    return next(c for c in response.status.conditions if c.type == "NetworkReady")


def _wait_for(predicate, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while not (value := predicate()) and time.time() < deadline:
        time.sleep(0.1)
    return value


def test_status_network_ready_follows_the_cni_directory() -> None:
    dirs = Dirs(short_tempdir()).make()
    stack = start_stack(dirs)  # dirs.cni starts empty
    try:
        condition = _network_ready(stack)
        assert condition.status is False
        assert condition.reason == "NetworkPluginNotReady"
        assert "no CNI configuration file" in condition.message and str(dirs.cni) in condition.message

        shutil.copy(REPO / "deploy" / "cni" / "10-criopy-bridge.conflist", dirs.cni / "10-criopy-bridge.conflist")
        assert _wait_for(lambda: _network_ready(stack).status), _network_ready(stack)

        (dirs.cni / "10-criopy-bridge.conflist").rename(dirs.cni / "10-criopy-bridge.conflist.disabled")
        assert _wait_for(lambda: not _network_ready(stack).status)
        assert _network_ready(stack).reason == "NetworkPluginNotReady"
        assert os.listdir(dirs.netns) == []  # nothing attached, nothing pinned
    finally:
        stack.stop()
        subprocess.run(["umount", "-l", str(dirs.netns)], capture_output=True)
        remove_dirs(dirs)
