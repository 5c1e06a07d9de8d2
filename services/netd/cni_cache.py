"""The on-disk cache of CNI ADD results, laid out as libcni lays it out.

One file per attachment, `<dir>/results/<network>-<container id>-<ifname>`,
holding the network configuration list that was used, the CNI_ARGS and
capability arguments, and the result. DEL and CHECK read it back, so they use
exactly what ADD used even after the configuration directory changed or netd
restarted. An entry found torn or garbage at start is moved to netd's
quarantine/: DEL then runs with the recorded configuration and no previous
result, as libcni does without a cache.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.netd import statefiles
from shared import quarantine


@dataclass(frozen=True)
class CachedAttachment:
    network_name: str
    container_id: str
    ifname: str
    config: str                         # the network list JSON
    cni_args: list[list[str]]
    capability_args: dict[str, Any]
    result: dict[str, Any]


class ResultCache:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, network_name: str, container_id: str, ifname: str) -> Path:
        return self.directory / "results" / f"{network_name}-{container_id}-{ifname}"

    def save(self, entry: CachedAttachment) -> None:
        statefiles.write_json(self.path(entry.network_name, entry.container_id, entry.ifname), {
            "kind": "cniCacheV1",
            "containerId": entry.container_id,
            "ifName": entry.ifname,
            "networkName": entry.network_name,
            "config": base64.b64encode(entry.config.encode()).decode(),
            "cniArgs": entry.cni_args,
            "capabilityArgs": entry.capability_args,
            "result": entry.result,
        })

    def load(self, network_name: str, container_id: str, ifname: str) -> CachedAttachment | None:
        """The cached attachment, or None if missing or unreadable."""
        try:
            return _decode(statefiles.read_json(self.path(network_name, container_id, ifname)))
        except (OSError, ValueError):
            return None

    def load_all(self) -> list[CachedAttachment]:
        """Every readable entry; the others are moved to quarantine (blocks)."""
        entries = []
        try:
            paths = sorted(p for p in (self.directory / "results").iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            return []
        for path in paths:
            try:
                entry = _decode(statefiles.read_json(path))
                if entry is None:
                    raise ValueError("not a CNI cache entry")
                if path != self.path(entry.network_name, entry.container_id, entry.ifname):
                    raise ValueError("not the entry its file name says")
            except (OSError, ValueError) as e:
                quarantine.set_aside(self.directory.parent, [path], kind="cni_cache", name=path.name,
                                     error=str(e) or type(e).__name__)
                continue
            entries.append(entry)
        return entries

    def remove(self, network_name: str, container_id: str, ifname: str) -> None:
        statefiles.remove(self.path(network_name, container_id, ifname))


def _decode(data: Any) -> CachedAttachment | None:
    """An entry as libcni writes it; None when `data` is not one."""
    if not isinstance(data, dict) or data.get("kind") != "cniCacheV1" or not isinstance(data.get("result"), dict):
        return None
    try:
        return CachedAttachment(
            network_name=data["networkName"], container_id=data["containerId"], ifname=data["ifName"],
            config=base64.b64decode(data["config"]).decode(), cni_args=data.get("cniArgs") or [],
            capability_args=data.get("capabilityArgs") or {}, result=data["result"])
    except (KeyError, TypeError, ValueError):
        return None
