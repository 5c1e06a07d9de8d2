"""Reading pod addresses and interfaces out of CNI results of any spec version.

0.1.0/0.2.0 results carry `ip4`/`ip6` objects; 0.3.0 and later an `ips` list
whose entries may point at an entry of `interfaces`.
"""

from __future__ import annotations

import ipaddress
from typing import Any


def _address(cidr: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(cidr, str):
        return None
    try:
        return ipaddress.ip_interface(cidr).ip
    except ValueError:
        return None


def interfaces(result: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for iface in result.get("interfaces") or []:
        if isinstance(iface, dict) and isinstance(iface.get("name"), str):
            out.append({k: str(iface[k]) for k in ("name", "mac", "sandbox") if iface.get(k)})
    return out


def pod_ips(result: dict[str, Any]) -> list[str]:
    """Addresses of the pod, in result order, without loopback ones; the first is the primary."""
    ifaces = result.get("interfaces") or []
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    if isinstance(result.get("ips"), list):
        for entry in result["ips"]:
            if not isinstance(entry, dict):
                continue
            index = entry.get("interface")
            if isinstance(index, int) and 0 <= index < len(ifaces):
                iface = ifaces[index]
                if isinstance(iface, dict) and iface.get("name") == "lo":
                    continue
            addr = _address(entry.get("address"))
            if addr is not None:
                found.append(addr)
    else:
        for key in ("ip4", "ip6"):
            block = result.get(key)
            if isinstance(block, dict):
                addr = _address(block.get("ip"))
                if addr is not None:
                    found.append(addr)
    seen: list[str] = []
    for addr in found:
        if addr.is_loopback or str(addr) in seen:
            continue
        seen.append(str(addr))
    return seen
