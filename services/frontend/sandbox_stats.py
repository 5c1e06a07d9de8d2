"""PodSandboxStats and ListPodSandboxStats: runtimed's cgroups, netd's interface counters, storaged's layers.

An answer is reused for a short while for the same request when nothing changed (answer_cache.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from cri_api.v1 import api_pb2

from services.frontend.container_stats import add_writable_layers
from services.frontend.registry import CallContext, cri_method
from services.frontend.runtime_convert import to_message
from shared.errors import CriopyError, InvalidArgument

log = structlog.get_logger(__name__)


def _interface(usage: dict[str, Any]) -> dict[str, Any]:
    return {"name": usage["name"], **{k: {"value": usage[k]} for k in ("rx_bytes", "rx_errors", "tx_bytes", "tx_errors")}}


def network_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """CRI NetworkUsage from netd's pod counters."""
    if not usage or "error" in usage:
        return None
    out: dict[str, Any] = {"timestamp": usage["timestamp_ns"],
                           "interfaces": [_interface(i) for i in usage.get("interfaces") or []]}
    if usage.get("default_interface"):
        out["default_interface"] = _interface(usage["default_interface"])
    return out


async def pod_network_stats(call: CallContext, pod_ids: list[str]) -> dict[str, Any]:
    """netd's counters per pod; empty when netd cannot answer (stats stay usable without them)."""
    if not pod_ids:
        return {}
    try:
        return await call.daemon("netd", "pod_network_stats", pod_ids=pod_ids)
    except CriopyError as e:
        log.warning("pod_network_stats_unavailable", error=e.message)
        return {}


async def _complete(call: CallContext, entries: list[dict[str, Any]]) -> list[api_pb2.PodSandboxStats]:
    pod_ids = [e["attributes"]["id"] for e in entries if e.get("netns_path")]
    containers = [c for e in entries for c in e["linux"].get("containers", [])]
    networks, _ = await asyncio.gather(pod_network_stats(call, pod_ids), add_writable_layers(call, containers))
    out = []
    for entry in entries:
        usage = network_usage(networks.get(entry["attributes"]["id"]))
        if usage is not None:
            entry["linux"]["network"] = usage
        out.append(to_message(entry, api_pb2.PodSandboxStats))
    return out


@cri_method("PodSandboxStats")
async def pod_sandbox_stats(request: api_pb2.PodSandboxStatsRequest,
                            call: CallContext) -> api_pb2.PodSandboxStatsResponse:
    if not request.pod_sandbox_id:
        raise InvalidArgument("pod_sandbox_id is required")

    async def measure() -> api_pb2.PodSandboxStatsResponse:
        entries = await call.daemon("runtimed", "list_sandbox_stats", sandbox_id=request.pod_sandbox_id)
        return api_pb2.PodSandboxStatsResponse(stats=(await _complete(call, entries))[0])

    return await call.reused(("PodSandboxStats", request.pod_sandbox_id), measure)


@cri_method("ListPodSandboxStats")
async def list_pod_sandbox_stats(request: api_pb2.ListPodSandboxStatsRequest,
                                 call: CallContext) -> api_pb2.ListPodSandboxStatsResponse:
    flt: dict[str, Any] = {}
    if request.HasField("filter"):
        if request.filter.id:
            flt["id"] = request.filter.id
        if request.filter.label_selector:
            flt["label_selector"] = dict(request.filter.label_selector)

    async def measure() -> api_pb2.ListPodSandboxStatsResponse:
        entries = await call.daemon("runtimed", "list_sandbox_stats", filter=flt)
        return api_pb2.ListPodSandboxStatsResponse(stats=await _complete(call, entries))

    return await call.reused(("ListPodSandboxStats", request.SerializeToString(deterministic=True)), measure)
