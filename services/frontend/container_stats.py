"""ContainerStats and ListContainerStats: cgroup numbers from runtimed, writable layers from storaged.

An answer is reused for a short while for the same request when nothing changed (answer_cache.py).
"""

from __future__ import annotations

from typing import Any

import structlog
from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from services.frontend.runtime_convert import to_message
from shared.errors import CriopyError, InvalidArgument

log = structlog.get_logger(__name__)


def stats_filter(f: api_pb2.ContainerStatsFilter) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.id:
        out["id"] = f.id
    if f.pod_sandbox_id:
        out["pod_sandbox_id"] = f.pod_sandbox_id
    if f.label_selector:
        out["label_selector"] = dict(f.label_selector)
    return out


async def add_writable_layers(call: CallContext, entries: list[dict[str, Any]]) -> None:
    """Fill each container's writable_layer from storaged; stats stay usable without it."""
    ids = [e["attributes"]["id"] for e in entries]
    if not ids:
        return
    try:
        usages = await call.daemon("storaged", "rootfs_usages", container_ids=ids)
    except CriopyError as e:
        log.warning("writable_layer_usage_unavailable", error=e.message)
        return
    for entry in entries:
        usage = usages.get(entry["attributes"]["id"])
        if usage:
            entry["writable_layer"] = {
                "timestamp": usage["timestamp_ns"], "fs_id": {"mountpoint": usage["mountpoint"]},
                "used_bytes": {"value": usage["used_bytes"]}, "inodes_used": {"value": usage["inodes_used"]}}


@cri_method("ContainerStats")
async def container_stats(request: api_pb2.ContainerStatsRequest, call: CallContext) -> api_pb2.ContainerStatsResponse:
    if not request.container_id:
        raise InvalidArgument("container_id is required")

    async def measure() -> api_pb2.ContainerStatsResponse:
        entries = await call.daemon("runtimed", "list_container_stats", container_id=request.container_id)
        await add_writable_layers(call, entries)
        return api_pb2.ContainerStatsResponse(stats=to_message(entries[0], api_pb2.ContainerStats))

    return await call.reused(("ContainerStats", request.container_id), measure)


@cri_method("ListContainerStats")
async def list_container_stats(request: api_pb2.ListContainerStatsRequest,
                               call: CallContext) -> api_pb2.ListContainerStatsResponse:
    flt = stats_filter(request.filter) if request.HasField("filter") else {}

    async def measure() -> api_pb2.ListContainerStatsResponse:
        entries = await call.daemon("runtimed", "list_container_stats", filter=flt)
        await add_writable_layers(call, entries)
        return api_pb2.ListContainerStatsResponse(stats=[to_message(e, api_pb2.ContainerStats) for e in entries])

    return await call.reused(("ListContainerStats", request.SerializeToString(deterministic=True)), measure)
