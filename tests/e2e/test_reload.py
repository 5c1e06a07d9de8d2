"""Changing the configuration of a running crio-py: SIGHUP and `criopy reload`."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from shared.services import START_ORDER
from tests.e2e.test_metrics import free_port
from tests.support.stack import Stack, criopy

pytestmark = pytest.mark.root


def levels(stack: Stack) -> dict[str, str]:
    return {name: s.get("log_level") for name, s in stack.status().items()}


def eventually(predicate, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_reload_applies_live_options_and_reports_the_rest(stack: Stack) -> None:
    assert set(levels(stack).values()) == {"info"}
    (stack.dirs.config_dir / "50-live.conf").write_text(
        '[crio.runtime]\nlog_level = "debug"\n[crio.api]\ngrpc_max_send_msg_size = 1024\n')
    result = criopy(stack.dirs, "reload")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["applied"]["crio.runtime.log_level"] == {"old": "info", "new": "debug"}
    assert report["needs_restart"] == ["crio.api.grpc_max_send_msg_size"]
    assert eventually(lambda: set(levels(stack).values()) == {"debug"}), levels(stack)
    logs = stack.logs()
    assert '"event": "config_reloaded"' in logs


def test_one_service_can_log_at_its_own_level(stack: Stack) -> None:
    (stack.dirs.config_dir / "55-netd.conf").write_text('[criopy.log]\nservice_log_levels = { netd = "debug" }\n')
    assert criopy(stack.dirs, "reload").returncode == 0
    assert eventually(lambda: levels(stack) == {**{n: "info" for n in START_ORDER}, "netd": "debug"}), levels(stack)


def test_a_broken_file_is_refused_and_the_running_configuration_stays(stack: Stack) -> None:
    (stack.dirs.config_dir / "60-broken.conf").write_text('[crio.runtime]\nlog_level = 7\n')
    result = criopy(stack.dirs, "reload")
    assert result.returncode != 0
    assert "60-broken.conf" in result.stderr and "crio.runtime.log_level" in result.stderr
    # SIGHUP with the same file: refused, logged, nothing stops.
    stack.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: '"event": "config_reload_refused"' in stack.logs())
    (stack.dirs.config_dir / "60-broken.conf").unlink()  # the status command reads the files too
    status = stack.status()
    assert all(status[name]["state"] == "up" for name in START_ORDER)
    assert set(levels(stack).values()) == {"info"}


def test_sighup_turns_the_metrics_endpoint_on(stack: Stack) -> None:
    port = free_port()
    (stack.dirs.config_dir / "70-metrics.conf").write_text(
        f"[crio.metrics]\nenable_metrics = true\nmetrics_port = {port}\n")
    os.kill(stack.process.pid, signal.SIGHUP)

    def serving() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    assert eventually(serving)
