"""attach/detach with the real containernetworking plugins in namespaces the tests create."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess

import pytest

from services.netd import netns
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.netd.netd_env import NetEnv
from tests.netd.netd_helpers import connect, listener

pytestmark = pytest.mark.root


def _free_port() -> int:
    for _ in range(100):
        port = random.randint(20000, 40000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


async def _attach(netd, pod_id: str, **kw):
    return await netd.attach(pod_id=pod_id, pod_name=f"name-{pod_id}", pod_namespace="default",
                             pod_uid=f"uid-{pod_id}", **kw)


async def test_two_pods_get_distinct_addresses_and_reach_each_other(net_env: NetEnv) -> None:
    net_env.write_conflist()
    netd = net_env.netd()
    await netd.start()
    a = await _attach(netd, "pod-a")
    b = await _attach(netd, "pod-b")
    assert a["netns_path"] == str(net_env.netns_dir / "criopy-pod-a")
    assert netns.is_pinned(a["netns_path"]) and netns.is_pinned(b["netns_path"])
    assert len(a["ips"]) == 1 and len(b["ips"]) == 1
    assert a["ips"] != b["ips"]
    assert all(ip.startswith(f"10.233.{net_env.index}.") for ip in a["ips"] + b["ips"])
    assert {i["name"] for i in a["interfaces"]} >= {"eth0", net_env.bridge}

    async with listener(a["netns_path"], "0.0.0.0", 8080):
        greeting = await connect(b["netns_path"], a["ips"][0], 8080)
    assert greeting == f"hello from pod to {b['ips'][0]}"

    assert await netd.pod_network(pod_id="pod-a") == a
    assert await netd.check_pod_network(pod_id="pod-a") == {"ok": True}

    # attach is idempotent on the pod id, also when the calls overlap.
    assert await _attach(netd, "pod-a") == a
    c1, c2 = await asyncio.gather(_attach(netd, "pod-c"), _attach(netd, "pod-c"))
    assert c1 == c2
    await netd.detach(pod_id="pod-c")
    assert len(net_env.veths()) == 2

    for pod in ("pod-a", "pod-b"):
        assert (await netd.detach(pod_id=pod))["detached"] is True
    assert await netd.pod_network(pod_id="pod-a") is None
    inv = net_env.inventory()
    assert inv["netns"] == [] and inv["mounts"] == [] and inv["veths"] == []
    assert inv["ipam"] == [] and inv["rules"] == []


async def test_host_port_reaches_the_pod_from_host_loopback(net_env: NetEnv) -> None:
    net_env.write_conflist()
    netd = net_env.netd()
    await netd.start()
    host_port = _free_port()
    pod = await _attach(netd, "web", port_mappings=[
        {"container_port": 8080, "host_port": host_port, "protocol": "TCP"},
        {"container_port": 9999, "host_port": 0},  # no host port: not published
    ])
    chains = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    assert f"--dport {host_port}" in chains and "9999" not in chains
    async with listener(pod["netns_path"], "0.0.0.0", 8080):
        greeting = await connect(None, "127.0.0.1", host_port)
    # Masqueraded by portmap's SNAT: the pod sees the bridge gateway, not 127.0.0.1.
    assert greeting == f"hello from pod to 10.233.{net_env.index}.1"
    await netd.detach(pod_id="web")
    chains = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    assert f"--dport {host_port}" not in chains
    with pytest.raises(ConnectionError):
        await connect(None, "127.0.0.1", host_port)


async def test_dual_stack_reports_v4_and_v6(net_env: NetEnv) -> None:
    net_env.write_conflist(net_env.default_plugins(ipv6=True))
    netd = net_env.netd()
    await netd.start()
    pod = await _attach(netd, "dual")
    assert len(pod["ips"]) == 2
    assert pod["ips"][0].startswith(f"10.233.{net_env.index}.")
    assert pod["ips"][1].startswith(f"fd00:233:{net_env.index}::")
    await netd.detach(pod_id="dual")
    assert net_env.ipam_reservations() == []


async def test_detach_after_restart_uses_cached_config_and_result(net_env: NetEnv) -> None:
    net_env.write_conflist()
    first = net_env.netd()
    await first.start()
    pod = await _attach(first, "survivor", port_mappings=[{"container_port": 80, "host_port": _free_port()}])
    cache_file = net_env.root / "state" / "netd" / "cni-cache" / "results" / f"{net_env.network}-survivor-eth0"
    cached = json.loads(cache_file.read_text())
    assert cached["kind"] == "cniCacheV1" and cached["result"]["ips"]
    await first.stop()

    # The configuration is gone by now: DEL must still work from the cache.
    (net_env.conf_dir / "10-test.conflist").unlink()
    second = net_env.netd()
    await second.start()
    assert second.readiness()["network_ready"] is False
    assert (await second.pod_network(pod_id="survivor"))["ips"] == pod["ips"]
    with pytest.raises(FailedPrecondition):
        await _attach(second, "newcomer")
    assert (await second.detach(pod_id="survivor"))["detached"] is True
    assert not cache_file.exists()
    inv = net_env.inventory()
    assert inv["netns"] == [] and inv["veths"] == [] and inv["ipam"] == [] and inv["rules"] == []
    assert (await second.detach(pod_id="survivor"))["detached"] is False  # twice


async def test_detach_when_the_namespace_is_already_gone(net_env: NetEnv) -> None:
    net_env.write_conflist()
    netd = net_env.netd()
    await netd.start()
    pod = await _attach(netd, "gone")
    await netns.remove(net_env.netns_dir / "criopy-gone")  # someone removed it behind netd's back
    assert not os.path.exists(pod["netns_path"])
    assert (await netd.detach(pod_id="gone"))["detached"] is True
    assert net_env.ipam_reservations() == []
    # The kernel destroys an unreferenced namespace (and the veth end in it) asynchronously.
    for _ in range(200):
        if not net_env.veths():
            break
        await asyncio.sleep(0.05)
    assert net_env.veths() == []
    # (bridge 1.1.1 finds the addresses whose masquerade rules it removes on the
    # pod's link, so with the namespace gone those rules stay: the fixture removes them.)


async def test_old_spec_versions(net_env: NetEnv) -> None:
    # 0.3.1 results carry a "version" per IP; DEL gets no prevResult before 0.4.0.
    net_env.write_conflist([net_env.bridge_plugin()], cni_version="0.3.1")
    netd = net_env.netd()
    await netd.start()
    pod = await _attach(netd, "old")
    assert pod["ips"][0].startswith(f"10.233.{net_env.index}.")
    with pytest.raises(FailedPrecondition, match="no CHECK"):
        await netd.check_pod_network(pod_id="old")
    await netd.detach(pod_id="old")
    assert net_env.ipam_reservations() == []


async def test_bad_requests_are_rejected(net_env: NetEnv) -> None:
    net_env.write_conflist()
    netd = net_env.netd()
    await netd.start()
    with pytest.raises(InvalidArgument):
        await _attach(netd, "../../etc")
    with pytest.raises(InvalidArgument):
        await netd.attach(pod_id="p", pod_name="a;b=c", pod_namespace="default", pod_uid="")
    with pytest.raises(InvalidArgument):
        await _attach(netd, "p", port_mappings=[{"container_port": 70000, "host_port": 1}])
    with pytest.raises(NotFound):
        await netd.check_pod_network(pod_id="nobody")
    assert net_env.inventory()["netns"] == []


async def test_concurrent_first_attaches_share_one_pin_directory_mount(net_env: NetEnv) -> None:
    net_env.write_conflist([net_env.bridge_plugin()])
    netd = net_env.netd()
    await netd.start()
    pods = [f"first-{i}" for i in range(4)]
    results = await asyncio.gather(*(_attach(netd, p) for p in pods))
    assert len({r["ips"][0] for r in results}) == 4
    with open("/proc/self/mountinfo") as f:
        dir_mounts = [line for line in f if line.split()[4] == str(net_env.netns_dir)]
    assert len(dir_mounts) == 1
    assert "shared:" in dir_mounts[0]  # unmounting a pin propagates to copies of this mount namespace
    await asyncio.gather(*(netd.detach(pod_id=p) for p in pods))
    assert net_env.inventory()["mounts"] == []
