"""Starting conmon when it misbehaves: the start times out cleanly, nothing is left running or blocked."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from services.runtimed import conmon, process
from services.runtimed.runc import Runc
from shared.errors import DeadlineExceeded


def fake_monitor(tmp_path: Path, body: str) -> conmon.ConmonSpec:
    script = tmp_path / "fake-conmon"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    return conmon.ConmonSpec(
        container_id="c1", name="c1", bundle=str(bundle), log_path=str(tmp_path / "c1.log"),
        exit_dir=str(tmp_path), socket_dir=str(tmp_path), persist_dir=str(bundle / "persist"),
        runc=Runc(path="/usr/bin/runc", root=str(tmp_path / "runc")), monitor_path=str(script))


def gone(pid: int) -> bool:
    """Not running and reaped: no process, not even a zombie, has this pid."""
    return not os.path.exists(f"/proc/{pid}")


async def test_a_monitor_that_never_forks_is_killed_and_reaped(tmp_path: Path) -> None:
    pidfile = tmp_path / "monitor.pid"
    spec = fake_monitor(tmp_path, f"echo $$ > {pidfile}\nexec sleep 60\n")
    with pytest.raises(DeadlineExceeded, match="conmon did not start"):
        await conmon.start(spec, timeout=1)
    assert gone(int(pidfile.read_text()))


async def test_a_monitor_that_never_reports_leaves_no_thread_blocked(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # Exits at once, as conmon does, but its child keeps the sync pipe open and never writes.
    spec = fake_monitor(tmp_path, f"sleep 60 &\necho $! > {pidfile}\nexit 0\n")
    threads = set(threading.enumerate())
    try:
        with pytest.raises(DeadlineExceeded, match="was not created"):
            await conmon.start(spec, timeout=1)
        assert set(threading.enumerate()) - threads == set()  # none new; earlier ones may have ended
    finally:
        child = int(pidfile.read_text())
        if process.pid_alive(child):
            os.kill(child, signal.SIGKILL)
