"""netd: pod network namespaces and CNI plugin calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.bus.service import Service


class Netd(Service):
    name = "netd"
    # Creating and pinning namespaces (SYS_ADMIN), configuring links, routes and
    # iptables through the CNI plugins (NET_ADMIN, NET_RAW).
    capabilities = frozenset({"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_NET_RAW"})

    def readiness(self) -> dict[str, Any]:
        conf_dir = Path(self.config.crio.network.network_dir)
        found = sorted(conf_dir.glob("*.conflist")) + sorted(conf_dir.glob("*.conf")) if conf_dir.is_dir() else []
        if found:
            return {"network_ready": True, "network_reason": "", "network_message": ""}
        return {
            "network_ready": False,
            "network_reason": "NetworkPluginNotReady",
            "network_message": f"no CNI configuration file in {conf_dir}",
        }
