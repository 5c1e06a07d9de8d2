"""Pinned network namespaces: create, loopback up, remove, idempotence, path safety."""

from __future__ import annotations

import os
import subprocess

import pytest

from services.netd import netns
from shared.errors import InvalidArgument

from tests.netd.netd_env import NetEnv

pytestmark = pytest.mark.root


def _mounted(path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


async def test_create_pins_a_namespace_with_loopback_up(net_env: NetEnv) -> None:
    path = netns.pin_path(net_env.netns_dir, "pod-a")
    await netns.create(path, timeout=10)
    try:
        assert netns.is_pinned(path)
        assert _mounted(path)
        # A namespace of its own, not the host's.
        assert os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino
        links = subprocess.run(["nsenter", f"--net={path}", "ip", "-o", "link", "show", "lo"],
                               capture_output=True, text=True, check=True).stdout
        assert "UP" in links.split("<")[1].split(">")[0].split(",")
        # Created twice: the same namespace stays (no stacked mount).
        inode = os.stat(path).st_ino
        await netns.create(path, timeout=10)
        assert os.stat(path).st_ino == inode
        assert sum(1 for line in open("/proc/self/mountinfo") if line.split()[4] == str(path)) == 1
    finally:
        await netns.remove(path)
    assert not path.exists()
    assert not _mounted(path)
    await netns.remove(path)  # idempotent


async def test_remove_unmounted_leftover_file(net_env: NetEnv) -> None:
    net_env.netns_dir.mkdir()
    path = netns.pin_path(net_env.netns_dir, "leftover")
    path.write_text("")
    assert not netns.is_pinned(path)
    await netns.remove(path)
    assert not path.exists()


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", ".hidden", "x" * 200, "/abs"])
def test_pod_ids_cannot_leave_the_netns_dir(tmp_path, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        netns.pin_path(tmp_path, bad)
