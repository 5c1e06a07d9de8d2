"""ListMetricDescriptors and ListPodSandboxMetrics: cAdvisor-style container metrics from the runtime.

The kubelet serves these on /metrics/cadvisor when it takes pod and container
metrics from the CRI. Families follow CRI-O's `[crio.stats] included_pod_metrics`
names; `container_last_seen` is always on. Values are unsigned integers, so
seconds are whole seconds, as CRI-O reports them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from shared.config import Config
from shared.errors import CriopyError

log = structlog.get_logger(__name__)

BASE_LABELS = ("id", "image", "namespace", "pod", "container")
COUNTER, GAUGE = api_pb2.MetricType.COUNTER, api_pb2.MetricType.GAUGE
_NS = 1_000_000_000

# name -> (help, extra label keys)
DESCRIPTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "container_last_seen": ("Last time a container was seen by the exporter", ()),
    "container_cpu_user_seconds_total": ("Cumulative user CPU time consumed in seconds.", ()),
    "container_cpu_system_seconds_total": ("Cumulative system CPU time consumed in seconds.", ()),
    "container_cpu_usage_seconds_total": ("Cumulative CPU time consumed in seconds.", ("cpu",)),
    "container_cpu_cfs_periods_total": ("Number of elapsed enforcement period intervals.", ()),
    "container_cpu_cfs_throttled_periods_total": ("Number of throttled period intervals.", ()),
    "container_cpu_cfs_throttled_seconds_total": ("Total time duration the container has been throttled.", ()),
    "container_memory_cache": ("Number of bytes of page cache memory.", ()),
    "container_memory_rss": ("Size of RSS in bytes.", ()),
    "container_memory_kernel_usage": ("Size of kernel memory allocated in bytes.", ()),
    "container_memory_mapped_file": ("Size of memory mapped files in bytes.", ()),
    "container_memory_swap": ("Container swap usage in bytes.", ()),
    "container_memory_failcnt": ("Number of memory usage hits limits", ()),
    "container_memory_usage_bytes": (
        "Current memory usage in bytes, including all memory regardless of when it was accessed", ()),
    "container_memory_max_usage_bytes": ("Maximum memory usage recorded in bytes", ()),
    "container_memory_working_set_bytes": ("Current working set in bytes.", ()),
    "container_memory_total_active_file_bytes": ("Current total active file in bytes.", ()),
    "container_memory_total_inactive_file_bytes": ("Current total inactive file in bytes.", ()),
    "container_memory_active_anon_bytes": ("Current active anonymous memory in bytes.", ()),
    "container_memory_inactive_anon_bytes": ("Current inactive anonymous memory in bytes.", ()),
    "container_memory_failures_total": ("Cumulative count of memory allocation failures.", ("failure_type", "scope")),
    "container_network_receive_bytes_total": ("Cumulative count of bytes received", ("interface",)),
    "container_network_receive_packets_total": ("Cumulative count of packets received", ("interface",)),
    "container_network_receive_packets_dropped_total": (
        "Cumulative count of packets dropped while receiving", ("interface",)),
    "container_network_receive_errors_total": ("Cumulative count of errors encountered while receiving", ("interface",)),
    "container_network_transmit_bytes_total": ("Cumulative count of bytes transmitted", ("interface",)),
    "container_network_transmit_packets_total": ("Cumulative count of packets transmitted", ("interface",)),
    "container_network_transmit_packets_dropped_total": (
        "Cumulative count of packets dropped while transmitting", ("interface",)),
    "container_network_transmit_errors_total": (
        "Cumulative count of errors encountered while transmitting", ("interface",)),
    "container_processes": ("Number of processes running inside the container.", ()),
    "container_fs_usage_bytes": ("Current filesystem usage in bytes.", ()),
    "container_fs_inodes_usage": ("Number of inodes used by the container's writable layer.", ()),
    "container_oom_events_total": ("Count of out of memory events observed for the container", ()),
    "container_spec_memory_limit_bytes": ("Memory limit for the container in bytes.", ()),
    "container_spec_cpu_period": ("CPU period of the container.", ()),
    "container_spec_cpu_shares": ("CPU share of the container.", ()),
    "container_spec_cpu_quota": ("CPU quota of the container.", ()),
    "container_start_time_seconds": ("Start time of the container since unix epoch in seconds.", ()),
}

FAMILIES: dict[str, tuple[str, ...]] = {
    "": ("container_last_seen",),
    "cpu": ("container_cpu_user_seconds_total", "container_cpu_system_seconds_total",
            "container_cpu_usage_seconds_total", "container_cpu_cfs_periods_total",
            "container_cpu_cfs_throttled_periods_total", "container_cpu_cfs_throttled_seconds_total"),
    "memory": ("container_memory_cache", "container_memory_rss", "container_memory_kernel_usage",
               "container_memory_mapped_file", "container_memory_swap", "container_memory_failcnt",
               "container_memory_usage_bytes", "container_memory_max_usage_bytes",
               "container_memory_working_set_bytes", "container_memory_total_active_file_bytes",
               "container_memory_total_inactive_file_bytes", "container_memory_active_anon_bytes",
               "container_memory_inactive_anon_bytes", "container_memory_failures_total"),
    "network": tuple(n for n in DESCRIPTORS if n.startswith("container_network_")),
    "process": ("container_processes",),
    "disk": ("container_fs_usage_bytes", "container_fs_inodes_usage"),
    "oom": ("container_oom_events_total",),
    "spec": ("container_spec_memory_limit_bytes", "container_spec_cpu_period", "container_spec_cpu_shares",
             "container_spec_cpu_quota", "container_start_time_seconds"),
}
# What runtimed must read from the cgroups for each family.
_SAMPLE_FAMILIES = {"cpu": ("cpu", "cpu_throttling"), "memory": ("memory", "memory_extra"),
                    "process": ("pids",), "oom": ("oom",), "spec": ("memory",)}


def included_families(config: Config) -> list[str]:
    """The configured families this runtime knows, in a stable order."""
    wanted = []
    for name in config.crio.stats.included_pod_metrics:
        if name not in FAMILIES or not name:
            log.warning("unknown_metric_family_ignored", family=name, known=sorted(f for f in FAMILIES if f))
        elif name not in wanted:
            wanted.append(name)
    return wanted


def descriptors(families: list[str]) -> list[api_pb2.MetricDescriptor]:
    out = []
    for family in ["", *families]:
        for name in FAMILIES[family]:
            help_text, extra = DESCRIPTORS[name]
            out.append(api_pb2.MetricDescriptor(name=name, help=help_text, label_keys=[*BASE_LABELS, *extra]))
    return out


@cri_method("ListMetricDescriptors")
async def list_metric_descriptors(_request: api_pb2.ListMetricDescriptorsRequest,
                                  call: CallContext) -> api_pb2.ListMetricDescriptorsResponse:
    return api_pb2.ListMetricDescriptorsResponse(descriptors=descriptors(included_families(call.config)))


class _Builder:
    """Metrics of one pod or container: base label values plus each value's own labels."""

    def __init__(self, labels: list[str], timestamp: int) -> None:
        self.labels = labels
        self.timestamp = timestamp
        self.metrics: list[api_pb2.Metric] = []

    def add(self, name: str, value: Any, kind: int = GAUGE, extra: tuple[str, ...] = ()) -> None:
        if value is None:
            return
        try:
            number = max(0, int(value))
        except (TypeError, ValueError):
            return
        self.metrics.append(api_pb2.Metric(name=name, timestamp=self.timestamp, metric_type=kind,
                                           label_values=[*self.labels, *extra],
                                           value=api_pb2.UInt64Value(value=number)))


def _seconds(ns: Any) -> int | None:
    return None if ns is None else int(ns) // _NS


def _container_metrics(b: _Builder, families: list[str], c: dict[str, Any], disk: dict[str, Any] | None) -> None:
    s = c["sample"]
    b.add("container_last_seen", time.time())
    if "cpu" in families:
        b.add("container_cpu_user_seconds_total", _seconds(s.get("cpu_user_ns")), COUNTER)
        b.add("container_cpu_system_seconds_total", _seconds(s.get("cpu_system_ns")), COUNTER)
        b.add("container_cpu_usage_seconds_total", _seconds(s.get("cpu_usage_ns")), COUNTER, ("total",))
        b.add("container_cpu_cfs_periods_total", s.get("cpu_periods"), COUNTER)
        b.add("container_cpu_cfs_throttled_periods_total", s.get("cpu_throttled_periods"), COUNTER)
        b.add("container_cpu_cfs_throttled_seconds_total", _seconds(s.get("cpu_throttled_ns")), COUNTER)
    if "memory" in families:
        for name, key in (("container_memory_cache", "memory_cache"), ("container_memory_rss", "memory_rss"),
                          ("container_memory_kernel_usage", "memory_kernel"),
                          ("container_memory_mapped_file", "memory_mapped_file"),
                          ("container_memory_swap", "memory_swap"),
                          ("container_memory_usage_bytes", "memory_usage"),
                          ("container_memory_max_usage_bytes", "memory_max_usage"),
                          ("container_memory_working_set_bytes", "memory_working_set"),
                          ("container_memory_total_active_file_bytes", "memory_active_file"),
                          ("container_memory_total_inactive_file_bytes", "memory_inactive_file"),
                          ("container_memory_active_anon_bytes", "memory_active_anon"),
                          ("container_memory_inactive_anon_bytes", "memory_inactive_anon")):
            b.add(name, s.get(key))
        b.add("container_memory_failcnt", s.get("memory_failcnt"), COUNTER)
        b.add("container_memory_failures_total", s.get("page_faults"), COUNTER, ("pgfault", "container"))
        b.add("container_memory_failures_total", s.get("major_page_faults"), COUNTER, ("pgmajfault", "container"))
    if "process" in families:
        b.add("container_processes", s.get("pids"))
    if "oom" in families:
        b.add("container_oom_events_total", s.get("oom_kills") or 0, COUNTER)
    if "disk" in families and disk:
        b.add("container_fs_usage_bytes", disk.get("used_bytes"))
        b.add("container_fs_inodes_usage", disk.get("inodes_used"))
    if "spec" in families:
        res = c.get("resources") or {}
        b.add("container_spec_memory_limit_bytes", s.get("memory_limit") or 0)
        b.add("container_spec_cpu_period", res.get("cpu_period") or 0)
        b.add("container_spec_cpu_shares", res.get("cpu_shares") or 0)
        b.add("container_spec_cpu_quota", res.get("cpu_quota") or 0)
        b.add("container_start_time_seconds", _seconds(c.get("started_at")))


_NETWORK: tuple[tuple[str, str], ...] = (
    ("container_network_receive_bytes_total", "rx_bytes"),
    ("container_network_receive_packets_total", "rx_packets"),
    ("container_network_receive_packets_dropped_total", "rx_dropped"),
    ("container_network_receive_errors_total", "rx_errors"),
    ("container_network_transmit_bytes_total", "tx_bytes"),
    ("container_network_transmit_packets_total", "tx_packets"),
    ("container_network_transmit_packets_dropped_total", "tx_dropped"),
    ("container_network_transmit_errors_total", "tx_errors"),
)


async def _optional(call: CallContext, daemon: str, method: str, **params: Any) -> dict[str, Any]:
    """A daemon's part of the metrics; missing (logged) when it cannot answer."""
    try:
        return await call.daemon(daemon, method, **params) or {}
    except CriopyError as e:
        log.warning("pod_metrics_part_unavailable", daemon=daemon, method=method, error=e.message)
        return {}


async def _nothing(value: dict[str, Any]) -> dict[str, Any]:
    return value


@cri_method("ListPodSandboxMetrics")
async def list_pod_sandbox_metrics(_request: api_pb2.ListPodSandboxMetricsRequest,
                                   call: CallContext) -> api_pb2.ListPodSandboxMetricsResponse:
    families = included_families(call.config)
    sample_families = sorted({f for fam in families for f in _SAMPLE_FAMILIES.get(fam, ())})
    pods = await call.daemon("runtimed", "metric_samples", families=sample_families)
    networked = [p["id"] for p in pods if p.get("netns_path")]
    container_ids = [c["id"] for p in pods for c in p["containers"]]
    no_answer: dict[str, Any] = {}
    network, disk = await asyncio.gather(
        _optional(call, "netd", "pod_network_stats", pod_ids=networked)
        if "network" in families and networked else _nothing(no_answer),
        _optional(call, "storaged", "rootfs_usages", container_ids=container_ids)
        if "disk" in families and container_ids else _nothing(no_answer))
    now = time.time_ns()
    out = []
    for pod in pods:
        pod_builder = _Builder([pod["id"], "", pod["namespace"], pod["name"], "POD"], now)
        pod_builder.add("container_last_seen", time.time())
        usage = network.get(pod["id"]) or {}
        for iface in usage.get("interfaces") or []:
            for name, key in _NETWORK:
                pod_builder.add(name, iface.get(key), COUNTER, (iface["name"],))
        container_metrics = []
        for c in pod["containers"]:
            b = _Builder([c["id"], c.get("image", ""), pod["namespace"], pod["name"], c.get("name", "")], now)
            _container_metrics(b, families, c, disk.get(c["id"]))
            container_metrics.append(api_pb2.ContainerMetrics(container_id=c["id"], metrics=b.metrics))
        out.append(api_pb2.PodSandboxMetrics(pod_sandbox_id=pod["id"], metrics=pod_builder.metrics,
                                             container_metrics=container_metrics))
    return api_pb2.ListPodSandboxMetricsResponse(pod_metrics=out)
