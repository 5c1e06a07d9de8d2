"""Starting a created container through runc's exec fifo: no `runc start` process, runc's answers kept."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from services.runtimed import exec_fifo, process
from services.runtimed.runc import Runc
from shared.errors import FailedPrecondition
from tests.runtimed.conftest import container_config, new_pod, run_to_exit


def fifo_of(root: Path, container_id: str) -> Path:
    (root / container_id).mkdir(parents=True)
    path = root / container_id / exec_fifo.FIFO_NAME
    os.mkfifo(path, 0o622)
    return path


async def test_the_waiting_init_gets_its_go_and_the_fifo_goes(tmp_path: Path) -> None:
    fifo = fifo_of(tmp_path, "c1")
    # What runc init does: block opening the fifo for writing, then write one byte.
    init = subprocess.Popen(["sh", "-c", f"printf 0 > {fifo}; sleep 0.2"])
    try:
        started = await exec_fifo.start(str(tmp_path), "c1", init.pid, process.process_start_time(init.pid),
                                        timeout=10)
        assert started is True
        assert not fifo.exists()
        assert await asyncio.to_thread(init.wait, 10) == 0
    finally:
        init.kill()
        init.wait()


async def test_a_dead_init_is_an_error_not_a_wait(tmp_path: Path) -> None:
    fifo_of(tmp_path, "c1")
    init = subprocess.Popen(["true"])
    init.wait()
    with pytest.raises(FailedPrecondition, match="not waiting"):
        await asyncio.wait_for(exec_fifo.start(str(tmp_path), "c1", init.pid, None, timeout=10), 5)


async def test_without_a_fifo_runc_is_asked(tmp_path: Path) -> None:
    assert await exec_fifo.start(str(tmp_path), "none", os.getpid(), None, timeout=1) is False
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / exec_fifo.FIFO_NAME).write_text("0")
    assert await exec_fifo.start(str(tmp_path), "file", os.getpid(), None, timeout=1) is False


@pytest.mark.root
async def test_pods_and_containers_start_without_runc_start(runtimed, cgroup_parent, rootfs, monkeypatch):
    ran: list[str] = []
    run = Runc._run

    async def recorded(self: Runc, sub: list[str], **kw: object) -> object:
        ran.append(sub[0])
        return await run(self, sub, **kw)

    monkeypatch.setattr(Runc, "_run", recorded)
    pod = await new_pod(runtimed, cgroup_parent, pid="POD")  # a pod of its own PID namespace has an init
    status, log = await run_to_exit(runtimed, pod, rootfs, container_config(command=["echo", "hello"]))
    assert status["exit_code"] == 0 and log.strip() == "hello"
    assert "start" not in ran
    # runc agrees the pod's init runs, as after `runc start`.
    sandbox = runtimed.ctx.records.sandbox(pod)
    state = await runtimed.ctx.runc(sandbox).state(pod)
    assert state is not None and state["status"] == "running"

