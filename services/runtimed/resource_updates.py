"""Live changes of limits: a container's (UpdateContainerResources, `runc update`) and a pod's own cgroup."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from services.runtimed import exits, pod_resources, spec_resources, stats
from services.runtimed.context import Context
from shared import atomic
from shared.errors import FailedPrecondition


async def update_container(ctx: Context, container_id: str, linux: dict | None) -> dict[str, Any]:
    """Change the container's cgroup limits live (runc update), and its spec to match."""
    records = ctx.records
    rec = records.container(container_id, visible=True)
    async with records.lock(rec["id"]):
        await exits.refresh(ctx, rec)
        if rec["state"] not in exits.LIVE:
            raise FailedPrecondition(f"container {container_id} is not running")
        resources, _oom = spec_resources.linux_resources(linux or {}, pids_limit=ctx.rc.pids_limit,
                                               hugetlb=ctx.features.hugetlb)
        await ctx.runc(rec).update(rec["id"], resources)
        await asyncio.to_thread(_record_in_spec, os.path.join(rec["bundle"], "config.json"), resources)
        rec["resources"] = dict(linux or {})
        await records.save_container(rec)
    return {}


def _record_in_spec(spec_path: str, resources: dict[str, Any]) -> None:
    """Write the new limits into the bundle's config.json (keeping its devices), for status and restarts."""
    with open(spec_path) as f:
        current = json.load(f)
    devices = current["linux"].get("resources", {}).get("devices")
    current["linux"]["resources"] = {**resources, **({"devices": devices} if devices else {})}
    atomic.write_json(spec_path, current, sort_keys=False)


async def update_sandbox(ctx: Context, sandbox_id: str, resources: dict | None,
                         overhead: dict | None) -> dict[str, Any]:
    """Apply pod-level limits to the pod's own cgroup (cgroupfs driver)."""
    records = ctx.records
    rec = records.sandbox(sandbox_id, visible=True)
    async with records.lock(rec["id"]):
        if rec["state"] != "ready":
            raise FailedPrecondition(f"pod sandbox {sandbox_id} is not ready")
        if ctx.systemd:
            raise FailedPrecondition("pod cgroups of the systemd cgroup driver are managed by systemd")
        path = stats.pod_cgroup_path(rec, records.sandboxes)
        if path is None:
            raise FailedPrecondition(f"pod sandbox {sandbox_id} has no cgroup of its own "
                                     f"(cgroup parent {rec.get('cgroup_parent')!r} is shared)")
        written = await asyncio.to_thread(pod_resources.apply, path, resources or {})
        rec["pod_resources"] = {"resources": resources or {}, "overhead": overhead or {}}
        await records.save_sandbox(rec)
    return {"cgroup": path, "written": written}
