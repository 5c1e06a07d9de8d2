"""Interface counters of pod namespaces, and the pod CIDR handed to IPAM as the ipRanges capability."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from services.netd import net_stats
from services.netd.net_stats_child import parse_net_dev
from shared.errors import InvalidArgument
from tests.netd.netd_env import NetEnv
from tests.netd.netd_helpers import connect, listener

pytestmark = pytest.mark.root

NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     140       2    0    0    0     0          0         0      140       2    0    0    0     0       0          0
  eth0:    5023      41    1    2    0     0          0         0     1200      12    3    4    0     0       0          0
"""


def test_proc_net_dev_is_parsed():
    counters = parse_net_dev(NET_DEV)
    assert counters["eth0"]["rx_bytes"] == 5023 and counters["eth0"]["rx_packets"] == 41
    assert counters["eth0"]["rx_errors"] == 1 and counters["eth0"]["rx_dropped"] == 2
    assert counters["eth0"]["tx_bytes"] == 1200 and counters["eth0"]["tx_errors"] == 3
    usage = net_stats.pod_usage({"timestamp_ns": 5, "interfaces": counters}, "eth0")
    assert [i["name"] for i in usage["interfaces"]] == ["eth0"]  # loopback is not the pod's traffic
    assert usage["default_interface"]["tx_dropped"] == 4


async def _attach(netd, pod_id: str):
    return await netd.attach(pod_id=pod_id, pod_name=f"name-{pod_id}", pod_namespace="default",
                             pod_uid=f"uid-{pod_id}")


async def test_counters_of_pods_move_with_traffic(net_env: NetEnv) -> None:
    net_env.write_conflist()
    netd = net_env.netd()
    await netd.start()
    a = await _attach(netd, "pod-a")
    b = await _attach(netd, "pod-b")
    before = await netd.pod_network_stats(pod_ids=["pod-a", "pod-b", "pod-missing"])
    assert set(before) == {"pod-a", "pod-b"}
    async with listener(a["netns_path"], "0.0.0.0", 8080):
        for _ in range(3):
            await connect(b["netns_path"], a["ips"][0], 8080)
    after = await netd.pod_network_stats()
    assert set(after) == {"pod-a", "pod-b"}
    for pod in ("pod-a", "pod-b"):
        old, new = before[pod]["default_interface"], after[pod]["default_interface"]
        assert new["name"] == "eth0" and [i["name"] for i in after[pod]["interfaces"]] == ["eth0"]
        assert new["rx_bytes"] > old["rx_bytes"] and new["tx_bytes"] > old["tx_bytes"]
        assert new["rx_packets"] >= old["rx_packets"] + 3
        assert after[pod]["timestamp_ns"] > before[pod]["timestamp_ns"]
    # A namespace that vanished under netd gives an error for that pod, not for the others.
    counters = await net_stats.read_counters([a["netns_path"], str(net_env.root / "no-such-netns")])
    assert "eth0" in counters[a["netns_path"]]["interfaces"]
    assert "error" in counters[str(net_env.root / "no-such-netns")]


async def test_pod_cidr_becomes_the_ipam_range(net_env: NetEnv) -> None:
    cidr = f"10.234.{net_env.index}.0/24"
    bridge = net_env.bridge_plugin()
    bridge["capabilities"] = {"ipRanges": True}
    bridge["ipam"] = {"type": "host-local", "dataDir": str(net_env.ipam_dir)}
    net_env.write_conflist([bridge, {"type": "loopback"}])
    netd = net_env.netd()
    await netd.start()
    with pytest.raises(InvalidArgument):
        await netd.update_pod_cidr(cidr="10.0.0.0/33")
    assert await netd.update_pod_cidr(cidr=cidr) == {"networks": [cidr]}
    pod = await _attach(netd, "pod-cidr")
    assert ipaddress.ip_address(pod["ips"][0]) in ipaddress.ip_network(cidr)
    await netd.detach(pod_id="pod-cidr")
    await netd.stop()
    # Kept across restarts.
    again = net_env.netd()
    await again.start()
    pod = await _attach(again, "pod-cidr2")
    assert ipaddress.ip_address(pod["ips"][0]) in ipaddress.ip_network(cidr)
    await again.detach(pod_id="pod-cidr2")
    assert Path(net_env.config.state_dir("netd"), "pod-cidr.json").exists()
