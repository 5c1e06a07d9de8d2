"""Which of runtimed's record writes wait for the disk: those a crash must find, not the others."""

from __future__ import annotations

import json

import pytest

from services.runtimed import store
from tests.runtimed.conftest import container_config, new_pod, run_to_exit


@pytest.mark.root
async def test_only_what_comes_before_a_step_is_synced(runtimed, cgroup_parent, rootfs, monkeypatch):
    """The record of a container being created is on disk before conmon runs (a crash is undone from
    it); the states written after create and start are not waited for."""
    written: list[tuple[str, bool]] = []
    write = store.atomic.write_bytes

    def recorded(path: str, data: bytes, **kw: object) -> None:
        if "/containers/" in str(path):
            written.append((json.loads(data)["state"], bool(kw.get("durable", True))))
        write(path, data, **kw)

    monkeypatch.setattr(store.atomic, "write_bytes", recorded)
    pod = await new_pod(runtimed, cgroup_parent)
    await run_to_exit(runtimed, pod, rootfs, container_config(command=["true"]))
    assert [w for w in written if w[0] in ("creating", "created", "running")] == [
        ("creating", True), ("created", False), ("running", False)]
