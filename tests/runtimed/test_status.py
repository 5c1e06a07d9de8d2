"""The list and status builders, on records alone."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from services.runtimed import exits, status


async def test_a_container_removed_while_its_exit_is_read_is_not_listed(monkeypatch):
    rec = {"id": "c" * 64, "name": "k8s_c", "sandbox_id": "p" * 64, "state": "running",
           "config": {"metadata": {"name": "c"}}}
    ctx: Any = SimpleNamespace(records=SimpleNamespace(containers={rec["id"]: rec}))

    async def removal_starts_meanwhile(_ctx: Any, record: dict) -> None:
        record["state"] = "removing"

    monkeypatch.setattr(exits, "refresh", removal_starts_meanwhile)
    assert await status.list_containers(ctx, None) == []
