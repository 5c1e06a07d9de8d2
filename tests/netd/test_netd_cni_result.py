"""Pod addresses from CNI results of each spec generation."""

from __future__ import annotations

from services.netd import cni_result


def test_current_results_skip_loopback_and_keep_order() -> None:
    result = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "cni0", "mac": "aa"}, {"name": "eth0", "mac": "bb", "sandbox": "/ns"},
                       {"name": "lo", "mac": "00", "sandbox": "/ns"}],
        "ips": [{"interface": 1, "address": "10.88.0.5/16", "gateway": "10.88.0.1"},
                {"interface": 1, "address": "fd00::5/64"},
                {"interface": 2, "address": "127.0.0.1/8"},
                {"address": "::1/128"}],
    }
    assert cni_result.pod_ips(result) == ["10.88.0.5", "fd00::5"]
    assert cni_result.interfaces(result)[1] == {"name": "eth0", "mac": "bb", "sandbox": "/ns"}


def test_020_results() -> None:
    result = {"cniVersion": "0.2.0", "ip4": {"ip": "10.1.2.3/24"}, "ip6": {"ip": "fd00::3/64"}}
    assert cni_result.pod_ips(result) == ["10.1.2.3", "fd00::3"]


def test_garbage_is_ignored() -> None:
    assert cni_result.pod_ips({"ips": [{"address": "nonsense"}, "x", {"address": 7}]}) == []
    assert cni_result.pod_ips({}) == []
