"""Checking attach parameters and turning them into CNI_ARGS and capability arguments."""

from __future__ import annotations

import ipaddress
from typing import Any

from shared.errors import InvalidArgument

# Burst used when a rate is given without one, as the kubelet does.
DEFAULT_BURST = 2**31 - 1
_PROTOCOLS = {"tcp", "udp", "sctp"}
# CRI's Protocol enum values, for callers that pass the number.
_PROTOCOL_NUMBERS = {0: "tcp", 1: "udp", 2: "sctp"}


def _plain(value: Any, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string")
    if not value and not allow_empty:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > 253 or any(c in value for c in ";=\0\n"):
        raise InvalidArgument(f"{what} {value!r:.80} is not valid: at most 253 characters, no ';', '=' or control characters")
    return value


def cni_args(pod_id: str, pod_name: str, pod_namespace: str, pod_uid: str) -> list[list[str]]:
    """The CNI_ARGS pairs the kubelet ecosystem passes (IgnoreUnknown first)."""
    return [
        ["IgnoreUnknown", "1"],
        ["K8S_POD_NAMESPACE", _plain(pod_namespace, "pod namespace")],
        ["K8S_POD_NAME", _plain(pod_name, "pod name")],
        ["K8S_POD_INFRA_CONTAINER_ID", pod_id],
        ["K8S_POD_UID", _plain(pod_uid, "pod uid", allow_empty=True)],
    ]


def _int(entry: dict[str, Any], keys: tuple[str, ...], what: str, low: int, high: int, default: int | None = None) -> int:
    for key in keys:
        if key in entry and entry[key] is not None:
            value = entry[key]
            break
    else:
        if default is None:
            raise InvalidArgument(f"{what} is missing")
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidArgument(f"{what} must be an integer from {low} to {high}, not {value!r:.40}")
    return value


def port_mappings(mappings: Any) -> list[dict[str, Any]]:
    """CRI port mappings (snake_case or CNI camelCase keys) as the portmap plugin wants them.

    Mappings without a host port are dropped: they publish nothing.
    """
    if mappings is None:
        return []
    if not isinstance(mappings, list):
        raise InvalidArgument("port_mappings must be a list")
    out = []
    for i, entry in enumerate(mappings):
        if not isinstance(entry, dict):
            raise InvalidArgument(f"port_mappings[{i}] must be a map")
        container_port = _int(entry, ("container_port", "containerPort"), f"port_mappings[{i}].container_port", 1, 65535)
        host_port = _int(entry, ("host_port", "hostPort"), f"port_mappings[{i}].host_port", 0, 65535, default=0)
        protocol = entry.get("protocol") or "tcp"
        if isinstance(protocol, int) and not isinstance(protocol, bool):
            protocol = _PROTOCOL_NUMBERS.get(protocol, str(protocol))
        if not isinstance(protocol, str) or protocol.lower() not in _PROTOCOLS:
            raise InvalidArgument(f"port_mappings[{i}].protocol must be TCP, UDP or SCTP, not {protocol!r:.20}")
        host_ip = entry.get("host_ip", entry.get("hostIP")) or ""
        if not isinstance(host_ip, str):
            raise InvalidArgument(f"port_mappings[{i}].host_ip must be a string")
        if host_ip:
            try:
                ipaddress.ip_address(host_ip)
            except ValueError:
                raise InvalidArgument(f"port_mappings[{i}].host_ip {host_ip!r:.60} is not an IP address") from None
        if host_port == 0:
            continue
        mapping: dict[str, Any] = {"hostPort": host_port, "containerPort": container_port,
                                   "protocol": protocol.lower()}
        if host_ip:
            mapping["hostIP"] = host_ip
        out.append(mapping)
    return out


def bandwidth(limits: Any) -> dict[str, int] | None:
    """Traffic shaping (bits per second, burst in bits) as the bandwidth plugin wants it."""
    if limits is None:
        return None
    if not isinstance(limits, dict):
        raise InvalidArgument("bandwidth must be a map")
    out: dict[str, int] = {}
    for way in ("ingress", "egress"):
        rate = _int(limits, (f"{way}_rate", f"{way}Rate"), f"bandwidth.{way}_rate", 0, 2**63 - 1, default=0)
        burst = _int(limits, (f"{way}_burst", f"{way}Burst"), f"bandwidth.{way}_burst", 0, 2**63 - 1, default=0)
        if rate:
            out[f"{way}Rate"] = rate
            out[f"{way}Burst"] = burst or DEFAULT_BURST
    return out or None
