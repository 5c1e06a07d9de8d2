"""Fixtures for netd: a private CNI world per test (see netd_env)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shared.config import Config
from tests.netd.netd_env import (PLUGIN_DIR, NetEnv, env_counter, iptables_chains, remove_idle_hostport_chains,
                                 remove_network_rules, require_root, umount_all)


@pytest.fixture
async def net_env(tmp_path: Path):
    require_root()
    n = next(env_counter) % 250
    root = tmp_path
    config = Config()
    conf_dir = root / "net.d"
    netns_dir = root / "netns"
    plugin_dir = root / "plugins"
    for d in (conf_dir, plugin_dir):
        d.mkdir()
    config.crio.root = str(root / "state")
    config.crio.runroot = str(root / "run")
    config.crio.network.network_dir = str(conf_dir)
    config.crio.network.netns_dir = str(netns_dir)
    config.crio.network.plugin_dirs = [str(plugin_dir), PLUGIN_DIR]
    config.crio.network.cni_timeout = 20.0
    env = NetEnv(root=root, index=n, config=config, conf_dir=conf_dir, netns_dir=netns_dir,
                 ipam_dir=root / "ipam", plugin_dir=plugin_dir, bridge=f"cpt{os.getpid() % 1000}x{n}",
                 network=f"cptest{n}", subnet=f"10.233.{n}.0/24", subnet6=f"fd00:233:{n}::/64")
    chains_before = iptables_chains()
    try:
        yield env
    finally:
        for netd in env.netds:
            try:
                await netd.stop()
            except Exception:
                pass
        if netns_dir.exists():
            for pin in netns_dir.iterdir():
                umount_all(pin)
                pin.unlink(missing_ok=True)
            umount_all(netns_dir)
        remove_network_rules(env.network)
        remove_idle_hostport_chains(iptables_chains() - chains_before)
        subprocess.run(["ip", "link", "del", env.bridge], capture_output=True)
