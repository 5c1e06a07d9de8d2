"""Exits are seen through inotify on conmon's exit directory, with no help from the safety poll."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from services.runtimed import exit_notices, exit_watcher
from services.runtimed.service import Runtimed
from tests.runtimed.conftest import container_config, make_config, new_container, new_pod, running

pytestmark = pytest.mark.root

# Long enough that, within a test, the poll never runs and waiters never look by themselves.
NEVER = 3600.0
WAIT = 30.0


@pytest.fixture
async def watched(base_dir: Path, cgroup_parent: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Runtimed]:
    monkeypatch.setattr(exit_watcher, "SAFETY_POLL", NEVER)
    monkeypatch.setattr(exit_notices, "RECHECK_WATCHED", NEVER)
    async with running(make_config(base_dir), base_dir, cgroup_parent) as service:
        yield service


def exits_of(rt: Runtimed) -> asyncio.Queue[dict[str, Any]]:
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    rt.add_event_hook(lambda e: events.put_nowait(e) if e["event"] == "exited" else None)
    return events


async def test_an_exit_nobody_asks_about_is_published(watched, cgroup_parent, rootfs):
    assert watched.ctx.exit_notices.watching
    events = exits_of(watched)
    pod = await new_pod(watched, cgroup_parent)
    cid = await new_container(watched, pod, rootfs, container_config(command=["sh", "-c", "sleep 0.3; exit 7"]))
    event = await asyncio.wait_for(events.get(), WAIT)
    assert (event["id"], event["exit_code"]) == (cid, 7)
    assert watched.containers[cid]["state"] == "exited"


async def test_stop_returns_once_the_exit_file_is_written(watched, cgroup_parent, rootfs):
    pod = await new_pod(watched, cgroup_parent)
    cid = await new_container(watched, pod, rootfs, container_config(
        command=["sh", "-c", "trap 'exit 5' TERM; while true; do sleep 0.1; done"]))
    # A grace period far beyond the test's patience: only the exit file's event ends the wait.
    await asyncio.wait_for(watched.stop_container(container_id=cid, timeout=int(NEVER)), WAIT)
    status = (await watched.container_status(container_id=cid))["status"]
    assert (status["state"], status["exit_code"]) == ("CONTAINER_EXITED", 5)


async def test_a_dead_infra_process_is_noticed(watched, cgroup_parent):
    pod = await new_pod(watched, cgroup_parent, pid="POD")
    rec = watched.sandboxes[pod]
    os.kill(rec["infra"]["pid"], 9)
    async with asyncio.timeout(WAIT):
        while not rec.get("infra_exited"):
            await asyncio.sleep(0.05)
    status = (await watched.sandbox_status(sandbox_id=pod))["status"]
    assert status["state"] == "SANDBOX_NOTREADY"
