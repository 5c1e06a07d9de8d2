"""Which of runtimed's record writes wait for the disk: those a crash must find, not the others."""

from __future__ import annotations

import json

import pytest

from services.runtimed import store
from tests.runtimed.conftest import container_config, new_container, new_pod, wait_exited


@pytest.mark.root
async def test_only_what_comes_before_a_step_is_synced(runtimed, cgroup_parent, rootfs, monkeypatch):
    """The record of a container being created is written before conmon runs (a runtimed killed
    meanwhile undoes it from there) and is on disk before CreateContainer answers; the states
    written after create and start are not waited for."""
    seen: list[tuple[str, ...]] = []
    write, sync = store.atomic.write_bytes, store.atomic.sync

    def recorded_write(path: str, data: bytes, **kw: object) -> None:
        if "/containers/" in str(path):
            seen.append(("write", json.loads(data)["state"], str(kw.get("durable", True))))
        write(path, data, **kw)

    def recorded_sync(path: str) -> None:
        with open(path) as f:
            seen.append(("sync", json.load(f)["state"]))
        sync(path)

    monkeypatch.setattr(store.atomic, "write_bytes", recorded_write)
    monkeypatch.setattr(store.atomic, "sync", recorded_sync)
    pod = await new_pod(runtimed, cgroup_parent)
    cid = await new_container(runtimed, pod, rootfs, container_config(command=["true"]), start=False)
    seen.append(("created",))
    await runtimed.start_container(container_id=cid)
    assert (await wait_exited(runtimed, cid))["exit_code"] == 0
    steps = [s for s in seen if s[0] in ("sync", "created") or s[1] in ("creating", "created", "running")]
    assert steps == [("write", "creating", "False"), ("sync", "creating"), ("write", "created", "False"),
                     ("created",), ("write", "running", "False")]
