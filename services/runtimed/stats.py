"""ContainerStats, PodSandboxStats and the cAdvisor-style metric samples of runtimed's containers and pods.

Samples come from cgroup_stats.py. The requests read many small files, so
they run in a thread (nothing blocks the event loop), on a snapshot of the
records taken on the loop, one at a time (the reader keeps CPU histories).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterable, TypeVar

from services.runtimed.cgroup_stats import ALL_FAMILIES, Sample, StatsReader, sum_samples
from services.runtimed.context import Context

T = TypeVar("T")


async def list_container_stats(ctx: Context, filter: dict | None, container_id: str | None) -> list[dict[str, Any]]:
    """CRI ContainerStats (cgroup CPU, memory, swap) of one container, or of those matching `filter`."""
    records = ctx.records
    if container_id is not None:
        rec = records.container(container_id, visible=True)
        sandbox = records.sandboxes.get(rec["sandbox_id"])
        return [await _sampled(ctx.stats, _container_stats, ctx.stats, rec, sandbox)]
    return await _sampled(ctx.stats, _list_container_stats, ctx.stats, dict(records.containers),
                          dict(records.sandboxes), filter or {})


async def list_sandbox_stats(ctx: Context, filter: dict | None, sandbox_id: str | None) -> list[dict[str, Any]]:
    """CRI PodSandboxStats without network counters (netd's), with each pod's netns path."""
    flt = dict(filter or {})
    if sandbox_id is not None:
        flt = {"id": ctx.records.sandbox(sandbox_id, visible=True)["id"]}
    return await _sampled(ctx.stats, _list_sandbox_stats, ctx.stats, dict(ctx.records.containers),
                          dict(ctx.records.sandboxes), flt)


async def metric_samples(ctx: Context, families: list | None) -> list[dict[str, Any]]:
    """Raw cgroup samples of every ready pod's running containers, for ListPodSandboxMetrics."""
    return await _sampled(ctx.stats, _metric_samples, ctx.stats, dict(ctx.records.containers),
                          dict(ctx.records.sandboxes), families if families is not None else sorted(ALL_FAMILIES))


async def _sampled(reader: StatsReader, fn: Callable[..., T], *args: Any) -> T:
    def locked() -> T:
        with reader.lock:
            return fn(*args)
    return await asyncio.to_thread(locked)


# -- CRI-shaped results -------------------------------------------------------------


def _value(v: int | None) -> dict[str, int] | None:
    return None if v is None else {"value": int(v)}


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def cpu_usage(sample: Sample, nano_cores: int | None) -> dict[str, Any]:
    return _drop_none({"timestamp": sample.timestamp_ns,
                       "usage_core_nano_seconds": _value(sample.cpu_usage_ns),
                       "usage_nano_cores": _value(nano_cores)})


def memory_usage(sample: Sample) -> dict[str, Any]:
    return _drop_none({"timestamp": sample.timestamp_ns,
                       "working_set_bytes": _value(sample.memory_working_set),
                       "available_bytes": _value(sample.memory_available),
                       "usage_bytes": _value(sample.memory_usage),
                       "rss_bytes": _value(sample.memory_rss),
                       "page_faults": _value(sample.page_faults),
                       "major_page_faults": _value(sample.major_page_faults)})


def swap_usage(sample: Sample) -> dict[str, Any] | None:
    if sample.memory_swap is None:
        return None
    return {"timestamp": sample.timestamp_ns, "swap_usage_bytes": {"value": sample.memory_swap}}


def sample_dict(sample: Sample) -> dict[str, Any]:
    """Every field of a sample, for the metrics (msgpack-friendly)."""
    out = {k: getattr(sample, k) for k in Sample.__dataclass_fields__}
    out["memory_available"] = sample.memory_available
    return out


# -- runtimed's containers and pods -------------------------------------------------

_LISTED_STATES = ("created", "running", "exited")


def attributes(rec: dict[str, Any]) -> dict[str, Any]:
    cfg = rec.get("config") or {}
    return {"id": rec["id"], "metadata": cfg.get("metadata") or {}, "labels": cfg.get("labels") or {},
            "annotations": cfg.get("annotations") or {}}


def _matches(rec: dict[str, Any], flt: dict[str, Any], pod_key: str) -> bool:
    if flt.get("id") and not rec["id"].startswith(flt["id"]):
        return False
    pod = flt.get("pod_sandbox_id")
    if pod and not str(rec.get(pod_key, "")).startswith(pod):
        return False
    labels = (rec.get("config") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in (flt.get("label_selector") or {}).items())


def _container_cgroup_path(rec: dict[str, Any], sandbox: dict[str, Any] | None) -> str | None:
    parent = (sandbox or {}).get("cgroup_parent")
    if not parent or parent.endswith(".slice"):
        return None
    return f"{parent.rstrip('/')}/crio-{rec['id']}"


def container_sample(reader: StatsReader, rec: dict[str, Any], sandbox: dict[str, Any] | None,
                     families: Iterable[str] = ALL_FAMILIES) -> Sample | None:
    """A sample of a running container's cgroup, None for any other state."""
    if rec.get("state") != "running":
        return None
    return reader.sample(rec["id"], rec.get("pid"), _container_cgroup_path(rec, sandbox), families)


def _container_stats(reader: StatsReader, rec: dict[str, Any], sandbox: dict[str, Any] | None) -> dict[str, Any]:
    """CRI ContainerStats as a dict (without the writable layer, which storaged knows)."""
    out: dict[str, Any] = {"attributes": attributes(rec)}
    sample = container_sample(reader, rec, sandbox)
    if sample is None:
        return out
    out["cpu"] = cpu_usage(sample, reader.nano_cores(rec["id"], sample, rec.get("started_at") or 0))
    out["memory"] = memory_usage(sample)
    swap = swap_usage(sample)
    if swap:
        out["swap"] = swap
    return out


def _list_container_stats(reader: StatsReader, containers: dict[str, dict[str, Any]],
                         sandboxes: dict[str, dict[str, Any]], flt: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for rec in list(containers.values()):
        if rec.get("state") not in _LISTED_STATES or not _matches(rec, flt, "sandbox_id"):
            continue
        out.append(_container_stats(reader, rec, sandboxes.get(rec.get("sandbox_id", ""))))
    reader.keep_only([*containers, *(f"pod:{i}" for i in sandboxes)])
    return out


def pod_cgroup_path(sandbox: dict[str, Any], sandboxes: dict[str, dict[str, Any]]) -> str | None:
    """The pod's own cgroup (cgroupfs driver), None when it is shared with other pods or unknown."""
    parent = sandbox.get("cgroup_parent")
    if not parent or parent.endswith(".slice"):
        return None
    if any(s is not sandbox and s.get("cgroup_parent") == parent for s in sandboxes.values()):
        return None
    return parent


def _sandbox_stats(reader: StatsReader, sandbox: dict[str, Any], containers: dict[str, dict[str, Any]],
                  sandboxes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """CRI PodSandboxStats as a dict: the pod's cgroup (or the sum of its containers) and each container.

    Network counters come from netd; the frontend adds them.
    """
    mine = [c for c in containers.values() if c.get("sandbox_id") == sandbox["id"]
            and c.get("state") in _LISTED_STATES]
    container_entries = [_container_stats(reader, c, sandbox) for c in mine]
    linux: dict[str, Any] = {"containers": container_entries}
    out: dict[str, Any] = {"attributes": attributes(sandbox), "linux": linux}
    if sandbox.get("state") != "ready":
        return out
    key = f"pod:{sandbox['id']}"
    path = pod_cgroup_path(sandbox, sandboxes)
    sample = reader.sample(key, None, path) if path else None
    if sample is None:
        parts = [s for s in (container_sample(reader, c, sandbox) for c in mine) if s is not None]
        if not parts:
            return out
        sample = sum_samples(parts)
    linux["cpu"] = cpu_usage(sample, reader.nano_cores(key, sample, sandbox.get("created_at") or 0))
    linux["memory"] = memory_usage(sample)
    if sample.pids is not None:
        linux["process"] = {"timestamp": sample.timestamp_ns, "process_count": {"value": sample.pids}}
    return out


def _list_sandbox_stats(reader: StatsReader, containers: dict[str, dict[str, Any]],
                       sandboxes: dict[str, dict[str, Any]], flt: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for sb in list(sandboxes.values()):
        if sb.get("state") not in ("ready", "notready") or not _matches(sb, flt, "id"):
            continue
        entry = _sandbox_stats(reader, sb, containers, sandboxes)
        entry["netns_path"] = sb.get("netns_path")
        entry["network_mode"] = sb.get("network_mode", "POD")
        out.append(entry)
    return out


def _metric_samples(reader: StatsReader, containers: dict[str, dict[str, Any]],
                   sandboxes: dict[str, dict[str, Any]], families: Iterable[str]) -> list[dict[str, Any]]:
    """Raw samples of every ready pod and its running containers, for the cAdvisor-style metrics."""
    fams = set(families)
    out = []
    for sb in list(sandboxes.values()):
        if sb.get("state") != "ready":
            continue
        entries = []
        for c in containers.values():
            if c.get("sandbox_id") != sb["id"] or c.get("state") != "running":
                continue
            sample = container_sample(reader, c, sb, fams)
            if sample is None:
                continue
            entries.append({"id": c["id"], "name": ((c.get("config") or {}).get("metadata") or {}).get("name", ""),
                            "image": c.get("image_name", ""), "started_at": c.get("started_at") or 0,
                            "resources": c.get("resources") or {}, "sample": sample_dict(sample)})
        meta = (sb.get("config") or {}).get("metadata") or {}
        out.append({"id": sb["id"], "name": meta.get("name", ""), "namespace": meta.get("namespace", ""),
                    "netns_path": sb.get("netns_path"), "network_mode": sb.get("network_mode", "POD"),
                    "containers": entries})
    return out
