"""Pods and containers through their whole life with real runc and conmon."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from services.runtimed import features
from shared.config import RuntimeHandler
from shared.errors import AlreadyExists, InvalidArgument, NotFound
from shared.reload import ReloadResult
from tests.runtimed.conftest import (IMAGE, conmon_pids, container_config, new_container, new_pod, pod_config,
                                     run_to_exit, wait_exited)

pytestmark = pytest.mark.root


async def test_container_lifecycle_exit_code_and_log(runtimed, cgroup_parent, rootfs, base_dir):
    pod = await new_pod(runtimed, cgroup_parent)
    cid = await new_container(runtimed, pod, rootfs,
                              container_config(command=["sh", "-c", "echo out; echo err >&2; exit 3"]), start=False)
    status = (await runtimed.container_status(container_id=cid))["status"]
    assert status["state"] == "CONTAINER_CREATED"
    assert status["created_at"] > 0 and status["started_at"] == 0
    await runtimed.start_container(container_id=cid)
    status = await wait_exited(runtimed, cid)
    assert status["exit_code"] == 3
    assert status["reason"] == "Error"
    assert status["finished_at"] >= status["started_at"] > 0
    lines = Path(status["log_path"]).read_text().splitlines()
    pattern = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) (stdout|stderr) (P|F) (.*)$")
    parsed = [pattern.match(line).group(2, 3, 4) for line in lines]
    assert ("stdout", "F", "out") in parsed and ("stderr", "F", "err") in parsed
    listed = await runtimed.list_containers(filter={"pod_sandbox_id": pod})
    assert [c["id"] for c in listed] == [cid]
    await runtimed.remove_container(container_id=cid)
    await runtimed.remove_container(container_id=cid)  # idempotent
    with pytest.raises(NotFound):
        await runtimed.container_status(container_id=cid)
    assert not os.path.exists(os.path.join(runtimed.ctx.state_dir, "containers", cid))
    assert conmon_pids(base_dir) == []


async def test_completed_reason(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    status, log = await run_to_exit(runtimed, pod, rootfs, container_config(command=["echo", "hello"]))
    assert status["exit_code"] == 0 and status["reason"] == "Completed"
    assert log == "hello\n"


async def test_sandbox_status_list_and_removal(runtimed, cgroup_parent, base_dir):
    pod = await new_pod(runtimed, cgroup_parent, name="web")
    status = (await runtimed.sandbox_status(sandbox_id=pod, verbose=True))["status"]
    assert status["state"] == "SANDBOX_READY"
    assert status["metadata"]["name"] == "web" and status["labels"] == {"app": "web"}
    assert status["runtime_handler"] == "runc"
    assert await runtimed.list_sandboxes(filter={"label_selector": {"app": "web"}})
    assert await runtimed.list_sandboxes(filter={"label_selector": {"app": "other"}}) == []
    assert await runtimed.list_sandboxes(filter={"state": {"state": "SANDBOX_NOTREADY"}}) == []
    await runtimed.stop_sandbox(sandbox_id=pod)
    await runtimed.stop_sandbox(sandbox_id=pod)
    listed = await runtimed.list_sandboxes(filter={"id": pod[:12]})
    assert [s["state"] for s in listed] == ["SANDBOX_NOTREADY"]
    await runtimed.remove_sandbox(sandbox_id=pod)
    await runtimed.remove_sandbox(sandbox_id=pod)
    assert await runtimed.list_sandboxes() == []
    with pytest.raises(NotFound):
        await runtimed.sandbox_status(sandbox_id=pod)
    assert not os.path.exists(os.path.join(runtimed.ctx.state_dir, "sandboxes", pod))


async def test_unknown_runtime_handler(runtimed, cgroup_parent):
    with pytest.raises(InvalidArgument):
        await runtimed.reserve_sandbox(config=pod_config(cgroup_parent), runtime_handler="kata")


async def test_runtime_handler_features_are_found_once_and_again_on_reload(runtimed, monkeypatch, base_dir):
    asked: list[str] = []
    real_version = features.runc.version

    async def counting_version(path: str) -> tuple[str, str]:
        asked.append(path)
        return await real_version(path)

    monkeypatch.setattr(features.runc, "version", counting_version)
    for _ in range(3):
        health = await runtimed.health()
    assert asked == []  # health (what Status asks) reads what start found
    assert [h["name"] for h in health["runtime_handlers"]] == ["runc"]
    assert health["default_runtime_handler"] == "runc" and "usable" in health["hugetlb"]
    # A reload that adds a handler examines the handlers again.
    fake = base_dir / "fake-runc"
    fake.write_text('#!/bin/sh\necho "runc version 1.0.0-rc93"\n')
    fake.chmod(0o755)
    old = dict(runtimed.ctx.rc.runtimes)
    runtimed.ctx.rc.runtimes = {**old, "old": RuntimeHandler(runtime_path=str(fake))}
    await runtimed.apply_config(ReloadResult(applied={"crio.runtime.runtimes": (old, runtimed.ctx.rc.runtimes)},
                                             needs_restart={}))
    assert sorted(asked) == sorted([str(fake), old["runc"].runtime_path])
    found = {h["name"]: h for h in (await runtimed.health())["runtime_handlers"]}
    assert found["old"]["recursive_read_only_mounts"] is False and "1.0.0-rc93" in found["old"]["reason"]


async def test_name_reservation(runtimed, cgroup_parent, rootfs):
    config = pod_config(cgroup_parent)
    first = await runtimed.reserve_sandbox(config=config)
    assert first["created"]
    # A retry of a pod still being made waits for it, then gets the same pod.
    import asyncio
    retry = asyncio.create_task(runtimed.reserve_sandbox(config=config, timeout=20))
    await asyncio.sleep(0.3)
    assert not retry.done()
    await runtimed.create_sandbox(sandbox_id=first["id"])
    again = await retry
    assert again["id"] == first["id"] and not again["created"]
    other = dict(config, labels={"different": "yes"})
    with pytest.raises(AlreadyExists):
        await runtimed.reserve_sandbox(config=other)
    cconfig = container_config(command=["true"])
    c1 = await runtimed.reserve_container(sandbox_id=first["id"], config=cconfig)
    await runtimed.release_container(container_id=c1["id"])
    c3 = await runtimed.reserve_container(sandbox_id=first["id"], config=cconfig)
    assert c3["created"] and c3["id"] != c1["id"]
    await runtimed.create_container(container_id=c3["id"], rootfs=rootfs, image=IMAGE)
    await runtimed.start_container(container_id=c3["id"])
    await wait_exited(runtimed, c3["id"])
    with pytest.raises(AlreadyExists):
        await runtimed.reserve_container(sandbox_id=first["id"], config=cconfig)


async def test_unknown_ids(runtimed):
    for call, kw in ((runtimed.container_status, {"container_id": "nope"}),
                     (runtimed.start_container, {"container_id": "nope"}),
                     (runtimed.sandbox_status, {"sandbox_id": "nope"}),
                     (runtimed.exec_sync, {"container_id": "nope", "cmd": ["true"]})):
        with pytest.raises(NotFound):
            await call(**kw)
    with pytest.raises(NotFound):
        await runtimed.reserve_container(sandbox_id="nope", config=container_config())


async def test_failed_create_leaves_nothing(runtimed, cgroup_parent, rootfs, base_dir):
    pod = await new_pod(runtimed, cgroup_parent)
    reserved = await runtimed.reserve_container(sandbox_id=pod, config=container_config(command=["/nonexistent"]))
    with pytest.raises(Exception):
        await runtimed.create_container(container_id=reserved["id"], rootfs=rootfs, image=IMAGE)
    await runtimed.release_container(container_id=reserved["id"])
    assert runtimed.containers == {}
    assert os.listdir(os.path.join(runtimed.ctx.state_dir, "containers")) == []
    assert conmon_pids(base_dir) == []


async def test_reservation_token_lets_the_same_request_resume(runtimed, cgroup_parent):
    config = pod_config(cgroup_parent)
    first = await runtimed.reserve_sandbox(config=config, token="req-1")
    # The same request retried (its reply lost): it gets its reservation back at once.
    again = await runtimed.reserve_sandbox(config=config, token="req-1", timeout=0)
    assert again == {"id": first["id"], "state": "reserved", "created": True}
    # Another request for the same name waits for the first one, here in vain: its time runs out.
    from shared.errors import DeadlineExceeded
    with pytest.raises(DeadlineExceeded):
        await runtimed.reserve_sandbox(config=config, token="req-2", timeout=0.2)
    await runtimed.release_sandbox(sandbox_id=first["id"])
    fresh = await runtimed.reserve_sandbox(config=config, token="req-2")
    assert fresh["created"] and fresh["id"] != first["id"]


async def test_a_reservation_outlives_no_frontend(runtimed, cgroup_parent):
    import asyncio

    from shared.errors import DeadlineExceeded
    config = pod_config(cgroup_parent)
    first = await runtimed.reserve_sandbox(config=config, token="req-1", holder="old")
    # A retry through the same frontend waits for the request still at work...
    with pytest.raises(DeadlineExceeded):
        await runtimed.reserve_sandbox(config=config, token="req-2", holder="old", timeout=0.2)
    # ...one through a new frontend (the old one died mid-call) takes the work over at once.
    taken = await runtimed.reserve_sandbox(config=config, token="req-3", holder="new", timeout=0)
    assert taken == {"id": first["id"], "state": "reserved", "created": True}

    # What no retry took over, the new frontend is handed to undo, as often as it asks.
    left = await runtimed.reserve_sandbox(config=pod_config(cgroup_parent, "left"), token="req-4", holder="old")
    found = await runtimed.take_over_reservations(holder="new")
    assert found == {"sandboxes": [left["id"]], "containers": [], "creating": 0}
    assert await runtimed.take_over_reservations(holder="new") == found
    # A retry of that pod meanwhile waits for the undo, then makes it anew.
    retry = asyncio.create_task(runtimed.reserve_sandbox(config=runtimed.sandboxes[left["id"]]["config"],
                                                         token="req-5", holder="new", timeout=20))
    await asyncio.sleep(0.3)
    assert not retry.done()
    await runtimed.release_sandbox(sandbox_id=left["id"])
    fresh = await retry
    assert fresh["created"] and fresh["id"] != left["id"]
    assert (await runtimed.take_over_reservations(holder="new"))["sandboxes"] == []
    assert set((await runtimed.record_ids())["sandboxes"]) == {first["id"], fresh["id"]}


async def test_a_shared_cgroup_parent_goes_with_the_last_pod_that_uses_it(runtimed, cgroup_parent, rootfs):
    from services.runtimed import cgroups

    # Pods of one parent, as the kubelet makes them without QoS cgroups; the first made the parent.
    first = await new_pod(runtimed, cgroup_parent, name="first")
    second = await new_pod(runtimed, cgroup_parent, name="second")
    await new_container(runtimed, second, rootfs, container_config(command=["sleep", "30"]))
    parent_dirs = cgroups.controller_dirs(cgroup_parent)
    for pod in (first, second):
        await runtimed.stop_sandbox(sandbox_id=pod)
        await runtimed.remove_sandbox(sandbox_id=pod)
        if pod == first:
            assert all(os.path.isdir(d) for d in parent_dirs)  # the second pod's container is in it
    assert not any(os.path.isdir(d) for d in parent_dirs)
