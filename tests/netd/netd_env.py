"""A private CNI world per test (conf dir, netns dir, bridge, subnet, IPAM dir).

Nothing here touches /etc/cni/net.d or /var/run/netns. Each test gets its own
bridge name, network name and 10.233.<n>.0/24 subnet; teardown removes
namespaces, the bridge and the iptables rules and chains the test created.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import json
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.netd.service import Netd
from shared.config import Config

PLUGIN_DIR = "/usr/lib/cni"


env_counter = itertools.count(10 + os.getpid() % 100)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("netd tests need root (namespaces, mounts, iptables)")
    if not Path(PLUGIN_DIR, "bridge").exists():
        pytest.skip("containernetworking-plugins are not installed")


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def umount_all(path: Path) -> None:
    for _ in range(16):
        if _libc.umount2(os.fsencode(path), 2) != 0:
            if ctypes.get_errno() in (errno.EINVAL, errno.ENOENT):
                return


# ---------------------------------------------------------------------------
# iptables bookkeeping


IPTABLES = ("iptables", "ip6tables")
TABLES = ("nat", "filter", "mangle")
BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


def iptables_rules(cmd: str, table: str) -> list[str]:
    out = subprocess.run([cmd, "-w", "-t", table, "-S"], capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else []


def iptables_chains() -> set[tuple[str, str, str]]:
    chains = set()
    for cmd in IPTABLES:
        for table in TABLES:
            for line in iptables_rules(cmd, table):
                if line.startswith("-N "):
                    chains.add((cmd, table, line.split()[1]))
    return chains


def rules_mentioning(text: str) -> list[str]:
    """Every rule (in any table, v4 and v6) whose text contains `text`."""
    found = []
    for cmd in IPTABLES:
        for table in TABLES:
            found += [f"{cmd} {table} {r}" for r in iptables_rules(cmd, table) if text in r]
    return found


def remove_chains(cmd: str, table: str, chains: set[str]) -> None:
    """Delete every rule jumping to `chains`, then flush and delete them."""
    for line in iptables_rules(cmd, table):
        if not line.startswith("-A "):
            continue
        words = shlex.split(line)
        if "-j" in words and words[words.index("-j") + 1] in chains:
            subprocess.run([cmd, "-w", "-t", table, "-D", *words[1:]], capture_output=True)
    for chain in chains:
        subprocess.run([cmd, "-w", "-t", table, "-F", chain], capture_output=True)
    for chain in chains:
        subprocess.run([cmd, "-w", "-t", table, "-X", chain], capture_output=True)


def remove_network_rules(network: str) -> None:
    """Delete the rules a network's plugins made (they name it), and the chains they jump to."""
    for cmd in IPTABLES:
        for table in TABLES:
            targets = set()
            for line in iptables_rules(cmd, table):
                if line.startswith("-A ") and f'name: \\"{network}\\"' in line:
                    words = shlex.split(line)
                    if "-j" in words and words[words.index("-j") + 1].startswith("CNI-"):
                        targets.add(words[words.index("-j") + 1])
                    subprocess.run([cmd, "-w", "-t", table, "-D", *words[1:]], capture_output=True)
            if targets:
                remove_chains(cmd, table, targets)


def remove_idle_hostport_chains(created: set[tuple[str, str, str]]) -> None:
    """portmap's shared top-level chains, if this test created them and no pod uses them now."""
    for cmd in IPTABLES:
        mine = {c for (k, t, c) in created if k == cmd and t == "nat" and c.startswith("CNI-HOSTPORT-")}
        in_use = any(line.startswith("-A CNI-HOSTPORT-DNAT ") for line in iptables_rules(cmd, "nat"))
        if mine and not in_use:
            remove_chains(cmd, "nat", mine)


def pod_chains(network: str, pod_ids: list[str]) -> set[str]:
    """Names of the per-pod chains bridge (masquerade) and portmap (DNAT) derive from network and pod id."""
    names = set()
    for pod_id in pod_ids:
        digest = hashlib.sha512((network + pod_id).encode()).hexdigest()
        names |= {"CNI-" + digest[:24], "CNI-DN-" + digest[:21]}
    return names


# ---------------------------------------------------------------------------
# The per-test CNI world


@dataclass
class NetEnv:
    root: Path
    index: int
    config: Config
    conf_dir: Path
    netns_dir: Path
    ipam_dir: Path
    plugin_dir: Path           # extra directory for fake plugins written by a test
    bridge: str
    network: str
    subnet: str
    subnet6: str
    netds: list[Netd] = field(default_factory=list)

    def bridge_plugin(self, *, ipv6: bool = False) -> dict[str, Any]:
        ranges = [[{"subnet": self.subnet}]]
        routes = [{"dst": "0.0.0.0/0"}]
        if ipv6:
            ranges.append([{"subnet": self.subnet6}])
            routes.append({"dst": "::/0"})
        return {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": True,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": str(self.ipam_dir), "ranges": ranges, "routes": routes}}

    def default_plugins(self, *, ipv6: bool = False) -> list[dict[str, Any]]:
        return [self.bridge_plugin(ipv6=ipv6),
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
                {"type": "loopback"}]

    def write_conflist(self, plugins: list[dict[str, Any]] | None = None, *, filename: str = "10-test.conflist",
                       name: str | None = None, cni_version: str = "1.0.0") -> Path:
        data = {"cniVersion": cni_version, "name": name or self.network,
                "plugins": plugins if plugins is not None else self.default_plugins()}
        path = self.conf_dir / filename
        tmp = path.with_suffix(".tmp-write")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
        return path

    def fake_plugin(self, name: str, script: str) -> Path:
        """A plugin written as a shell script, for error paths."""
        path = self.plugin_dir / name
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)
        return path

    def netd(self) -> Netd:
        netd = Netd(self.config)
        self.netds.append(netd)
        return netd

    # -- leak inventory -------------------------------------------------------

    def ipam_reservations(self) -> list[str]:
        out = []
        for d in self.ipam_dir.glob("*"):
            out += [p.name for p in d.iterdir()
                    if p.name != "lock" and not p.name.startswith("last_reserved_ip")]
        return sorted(out)

    def veths(self) -> list[str]:
        data = json.loads(sh("ip", "-j", "link", "show", "master", self.bridge, check=False) or "[]")
        return sorted(link["ifname"] for link in data)

    def mounts(self) -> list[str]:
        with open("/proc/self/mountinfo") as f:
            return [line.split()[4] for line in f if line.split()[4].startswith(str(self.netns_dir) + "/")]

    def inventory(self, pod_ids: list[str] = ()) -> dict[str, Any]:
        """What pods leave behind; `pod_ids` adds their per-pod iptables chains."""
        ours = pod_chains(self.network, list(pod_ids))
        return {
            "netns": sorted(os.listdir(self.netns_dir)) if self.netns_dir.exists() else [],
            "mounts": self.mounts(),
            "veths": self.veths(),
            "ipam": self.ipam_reservations(),
            "rules": rules_mentioning(f'name: \\"{self.network}\\"') + rules_mentioning(f'name: "{self.network}"'),
            "chains": sorted(c for c in iptables_chains() if c[2] in ours),
        }


