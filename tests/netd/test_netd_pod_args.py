"""attach parameters: CNI_ARGS, port mappings and bandwidth as the plugins want them."""

from __future__ import annotations

import pytest

from services.netd import pod_args
from shared.errors import InvalidArgument


def test_port_mappings_accept_cri_and_cni_spellings() -> None:
    assert pod_args.port_mappings([
        {"container_port": 80, "host_port": 8080, "protocol": "TCP", "host_ip": ""},
        {"containerPort": 53, "hostPort": 5353, "protocol": 1, "hostIP": "127.0.0.1"},
        {"container_port": 9000, "protocol": 2},  # no host port: nothing to publish
    ]) == [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"},
    ]
    assert pod_args.port_mappings(None) == []


@pytest.mark.parametrize("bad", [
    "not a list", [1], [{"host_port": 80}], [{"container_port": 0, "host_port": 1}],
    [{"container_port": 80, "host_port": 1, "protocol": "icmp"}],
    [{"container_port": 80, "host_port": 1, "host_ip": "example.com"}],
    [{"container_port": True, "host_port": 1}],
])
def test_bad_port_mappings(bad) -> None:
    with pytest.raises(InvalidArgument):
        pod_args.port_mappings(bad)


def test_bandwidth() -> None:
    assert pod_args.bandwidth(None) is None
    assert pod_args.bandwidth({}) is None
    assert pod_args.bandwidth({"ingress_rate": 1000, "egressRate": 2000, "egress_burst": 300}) == {
        "ingressRate": 1000, "ingressBurst": pod_args.DEFAULT_BURST, "egressRate": 2000, "egressBurst": 300}
    with pytest.raises(InvalidArgument):
        pod_args.bandwidth({"ingress_rate": -1})


def test_cni_args() -> None:
    assert pod_args.cni_args("p1", "web", "default", "") == [
        ["IgnoreUnknown", "1"], ["K8S_POD_NAMESPACE", "default"], ["K8S_POD_NAME", "web"],
        ["K8S_POD_INFRA_CONTAINER_ID", "p1"], ["K8S_POD_UID", ""]]
    for bad in ("a;b", "a=b", "", "x\n"):
        with pytest.raises(InvalidArgument):
            pod_args.cni_args("p1", bad, "default", "")
