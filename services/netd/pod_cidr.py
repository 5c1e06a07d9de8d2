"""The node's pod CIDR (UpdateRuntimeConfig), handed to CNI plugins as the `ipRanges` capability.

IPAM plugins that declare `"capabilities": {"ipRanges": true}` (host-local does)
allocate pod addresses from it instead of their configured ranges; other
plugins never see it. It is kept in netd's state, so it survives restarts.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from shared import atomic
from shared.errors import InvalidArgument


def parse(cidr: str) -> list[str]:
    """The networks of a pod CIDR string: one, or one per family separated by commas."""
    out: list[str] = []
    for part in (p.strip() for p in (cidr or "").split(",")):
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise InvalidArgument(f"pod CIDR {part!r} is not a network address (e.g. 10.244.1.0/24)") from None
    if len({ipaddress.ip_network(n).version for n in out}) != len(out):
        raise InvalidArgument(f"pod CIDR {cidr!r} names more than one network of the same family")
    return out


def capability(networks: list[str]) -> dict[str, Any]:
    """The CNI capability arguments for the networks: one range set per family."""
    if not networks:
        return {}
    return {"ipRanges": [[{"subnet": n}] for n in networks]}


def load(path: Path) -> list[str]:
    try:
        return list(json.loads(path.read_text()).get("networks") or [])
    except (OSError, ValueError, AttributeError):
        return []


def save(path: Path, networks: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, {"networks": networks})
