"""CNI configuration: which file wins, what is skipped and why, and NetworkReady following the directory."""

from __future__ import annotations

import asyncio
import json

import pytest
import structlog

from services.netd import cni_config
from tests.netd.netd_env import PLUGIN_DIR, NetEnv

pytestmark = pytest.mark.root


def _net(name: str, plugin_type: str = "bridge", version: str = "1.0.0") -> str:
    return json.dumps({"cniVersion": version, "name": name, "plugins": [{"type": plugin_type}]})


def test_first_valid_file_in_lexical_order_wins(tmp_path) -> None:
    (tmp_path / "30-c.conflist").write_text(_net("c"))
    (tmp_path / "10-broken.conflist").write_text("{ not json")
    (tmp_path / "20-b.conf").write_text(json.dumps({"cniVersion": "0.4.0", "name": "b", "type": "bridge"}))
    (tmp_path / "05-noplugin.conflist").write_text(_net("x", plugin_type="no-such-plugin"))
    (tmp_path / "00-ignored.txt").write_text(_net("txt"))
    scan = cni_config.scan(tmp_path, [PLUGIN_DIR])
    assert scan.network is not None
    assert scan.network.name == "b"
    assert scan.network.cni_version == "0.4.0"
    assert scan.network.plugin_types == ["bridge"]  # a .conf becomes a one-plugin list
    assert "not valid JSON" in scan.skipped[str(tmp_path / "10-broken.conflist")]
    assert "no-such-plugin" in scan.skipped[str(tmp_path / "05-noplugin.conflist")]


def test_default_network_is_picked_by_name(tmp_path) -> None:
    (tmp_path / "10-a.conflist").write_text(_net("a"))
    (tmp_path / "20-b.conflist").write_text(_net("b"))
    assert cni_config.scan(tmp_path, [PLUGIN_DIR], "b").network.name == "b"
    missing = cni_config.scan(tmp_path, [PLUGIN_DIR], "zzz")
    assert missing.network is None
    assert "'zzz'" in missing.message


@pytest.mark.parametrize("content, reason", [
    ('[1, 2]', "not a JSON object"),
    (json.dumps({"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}), "'name'"),
    (json.dumps({"cniVersion": "9.9.9", "name": "n", "plugins": [{"type": "bridge"}]}), "not supported"),
    (json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": []}), "non-empty"),
    (json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../../bin/sh"}]}), "plugin name"),
    (json.dumps({"cniVersion": "1.0.0", "name": "bad name!", "plugins": [{"type": "bridge"}]}), "'name'"),
])
def test_malformed_conflist_is_skipped_with_reason(tmp_path, content: str, reason: str) -> None:
    (tmp_path / "10-bad.conflist").write_text(content)
    scan = cni_config.scan(tmp_path, [PLUGIN_DIR])
    assert scan.network is None
    assert reason in scan.skipped[str(tmp_path / "10-bad.conflist")]
    assert reason in scan.message


async def test_network_ready_follows_the_directory(net_env: NetEnv) -> None:
    netd = net_env.netd()
    await netd.start()
    ready = netd.readiness()
    assert ready["network_ready"] is False
    assert ready["network_reason"] == "NetworkPluginNotReady"
    assert "no CNI configuration file" in ready["network_message"]
    assert str(net_env.conf_dir) in ready["network_message"]

    net_env.write_conflist()
    assert netd.readiness() == {"network_ready": True, "network_reason": "", "network_message": ""}
    health = await netd.health()
    assert health["network_ready"] is True

    # A broken file that sorts first is skipped; the valid one still counts.
    (net_env.conf_dir / "05-broken.conflist").write_text("{")
    assert netd.readiness()["network_ready"] is True

    (net_env.conf_dir / "10-test.conflist").unlink()
    ready = netd.readiness()
    assert ready["network_ready"] is False
    assert "05-broken.conflist" in ready["network_message"]
    assert "not valid JSON" in ready["network_message"]


async def test_malformed_file_is_logged(net_env: NetEnv) -> None:
    (net_env.conf_dir / "05-broken.conflist").write_text("{")
    with structlog.testing.capture_logs() as logs:
        netd = net_env.netd()
        await netd.start()
    skipped = [e for e in logs if e["event"] == "cni_config_skipped"]
    assert skipped and skipped[0]["file"].endswith("05-broken.conflist")
    assert "not valid JSON" in skipped[0]["reason"]


async def test_background_watch_notices_a_new_file(net_env: NetEnv) -> None:
    netd = net_env.netd()
    netd._watcher.poll_interval = 0.05
    await netd.start()
    with structlog.testing.capture_logs() as logs:
        net_env.write_conflist()
        for _ in range(200):
            if any(e["event"] == "cni_network_loaded" for e in logs):
                break
            await asyncio.sleep(0.05)
    loaded = [e for e in logs if e["event"] == "cni_network_loaded"]
    assert loaded and loaded[0]["network"] == net_env.network
