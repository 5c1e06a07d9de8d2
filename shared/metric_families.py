"""The Prometheus families of shared/metrics.py, built when metrics are turned on (`metrics.enable`).

Importing this module loads prometheus_client, and with it the HTTP, e-mail
and compression modules its package imports: several MiB in each process,
which a node with metrics off (CRI-O's default) does not pay.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import Metric

from shared.metrics import CRIO_PREFIX

# CRI-O exports no `_created` series; neither do we, for its families or ours.
prometheus_client.disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, process_cpu_seconds_total...

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# every process
SERVICE_RESTARTS = Counter(
    "criopy_service_restarts_total", "Times the supervisor restarted this service before this start.",
    registry=REGISTRY)
BUS_REFUSED = Counter(
    "criopy_bus_refused_total", "Bus calls, event subscriptions and stream connections refused for their "
    "caller's credentials, by kind and caller.", ["kind", "caller"], registry=REGISTRY)

# frontend
OPERATIONS = Counter(
    "criopy_operations_total", "CRI operations served, by method and gRPC code.",
    ["operation", "code"], registry=REGISTRY)
OPERATION_LATENCY = Histogram(
    "criopy_operations_latency_seconds", "Latency of CRI operations.",
    ["operation"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
BUS_CALLS = Counter(
    "criopy_bus_calls_total", "Bus calls made by the frontend, by daemon, method and outcome.",
    ["daemon", "method", "outcome"], registry=REGISTRY)
BUS_CALL_LATENCY = Histogram(
    "criopy_bus_call_duration_seconds", "Latency of bus calls, retries included.",
    ["daemon", "method"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
READ_MODEL_SYNCS = Counter(
    "criopy_read_model_syncs_total",
    "Copies of a daemon's state the read model built from a snapshot: at start, then after the daemon "
    "restarted or a change was lost.", ["daemon"], registry=REGISTRY)

# imaged
IMAGE_PULLS = Counter(
    "criopy_image_pulls_total", "Image pulls, by outcome (success or the failure's reason).",
    ["outcome"], registry=REGISTRY)
IMAGE_PULL_BYTES = Counter(
    "criopy_image_pulls_bytes_total", "Bytes downloaded from registries.", registry=REGISTRY)
IMAGE_PULL_DURATION = Histogram(
    "criopy_image_pulls_duration_seconds", "Duration of image pulls.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=REGISTRY)

# Every daemon: a record found unreadable at start (torn by a power cut, garbage) and
# moved aside into the service's quarantine directory; the merged page adds `service`.
STATE_RECORDS_QUARANTINED = Counter(
    "criopy_state_records_quarantined_total",
    "State records found damaged at start and moved aside, by kind of record.",
    ["kind"], registry=REGISTRY)

# runtimed
CONTAINERS = Gauge(
    "criopy_containers", "Containers by state.", ["state"], registry=REGISTRY)
PODS = Gauge(
    "criopy_pods", "Pod sandboxes by state.", ["state"], registry=REGISTRY)
OOM_KILLS = Counter(
    "criopy_containers_oom_total", "Containers killed by the kernel's OOM killer.", registry=REGISTRY)

# netd
CNI_CALL_LATENCY = Histogram(
    "criopy_cni_call_duration_seconds", "Latency of CNI plugin calls, by plugin and command.",
    ["plugin", "command"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)


# -- CRI-O's families ----------------------------------------------------------------

# Family name (as a parsed exposition page names it) -> the one service that fills it.
CRIO_OWNERS: dict[str, str] = {}


class _WindowSummary:
    """A summary with quantiles, as CRI-O's Go client computes them: over the last ten minutes.

    prometheus_client's Summary has no quantiles. This keeps each label
    value's recent observations (at most `keep`, none older than `max_age`)
    and ranks them when scraped; count and sum cover every observation.
    """

    def __init__(self, name: str, documentation: str, label: str, quantiles: tuple[float, ...],
                 max_age: float = 600.0, keep: int = 1000) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.quantiles = quantiles
        self.max_age = max_age
        self.keep = keep
        self._lock = threading.Lock()
        self._series: dict[str, tuple[deque[tuple[float, float]], list[float]]] = {}

    def observe(self, label_value: str, value: float) -> None:
        now = time.monotonic()
        with self._lock:
            window, totals = self._series.setdefault(label_value, (deque(maxlen=self.keep), [0.0, 0.0]))
            window.append((now, value))
            totals[0] += 1
            totals[1] += value

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, "summary")]

    def collect(self) -> list[Metric]:
        family = Metric(self.name, self.documentation, "summary")
        oldest = time.monotonic() - self.max_age
        with self._lock:
            for label_value, (window, (count, total)) in sorted(self._series.items()):
                while window and window[0][0] < oldest:
                    window.popleft()
                ranked = sorted(v for _, v in window)
                for q in self.quantiles:
                    value = ranked[max(0, math.ceil(q * len(ranked)) - 1)] if ranked else math.nan
                    family.add_sample(self.name, {self.label: label_value, "quantile": str(q)}, value)
                family.add_sample(f"{self.name}_sum", {self.label: label_value}, total)
                family.add_sample(f"{self.name}_count", {self.label: label_value}, count)
        return [family]


C = TypeVar("C", Counter, Gauge, Histogram, _WindowSummary)


def _crio(owner: str, collector: C) -> C:
    if isinstance(collector, _WindowSummary):
        REGISTRY.register(collector)  # type: ignore[arg-type]
    for family in collector.describe():
        CRIO_OWNERS[family.name] = owner
    return collector


# frontend: CRI operations, as CRI-O's gRPC interceptor counts them.
CRIO_OPERATIONS = _crio("frontend", Counter(
    CRIO_PREFIX + "operations_total", "Cumulative number of CRI-O operations by operation type.",
    ["operation"], registry=REGISTRY))
CRIO_OPERATIONS_ERRORS = _crio("frontend", Counter(
    CRIO_PREFIX + "operations_errors_total", "Cumulative number of CRI-O operation errors by operation type.",
    ["operation"], registry=REGISTRY))
CRIO_OPERATIONS_LATENCY = _crio("frontend", Gauge(
    CRIO_PREFIX + "operations_latency_seconds",
    "Latency in seconds of individual CRI calls for CRI-O operations. Broken down by operation type.",
    ["operation"], registry=REGISTRY))
CRIO_OPERATIONS_LATENCY_TOTAL = _crio("frontend", _WindowSummary(
    CRIO_PREFIX + "operations_latency_seconds_total",
    "Latency in seconds of CRI-O operations. Broken down by operation type.",
    "operation", (0.5, 0.9, 0.99)))

# frontend: a pull succeeds or fails as a whole CRI call (fetch, unpack, record).
CRIO_IMAGE_PULLS_SUCCESS = _crio("frontend", Counter(
    CRIO_PREFIX + "image_pulls_success_total", "Cumulative number of CRI-O image pull successes.",
    registry=REGISTRY))
CRIO_IMAGE_PULLS_FAILURE = _crio("frontend", Counter(
    CRIO_PREFIX + "image_pulls_failure_total", "Cumulative number of CRI-O image pull failures by error.",
    ["error"], registry=REGISTRY))
# frontend: its event hub drops events for a GetContainerEvents client that falls behind.
CRIO_CONTAINERS_EVENTS_DROPPED = _crio("frontend", Counter(
    CRIO_PREFIX + "containers_events_dropped_total", "Amount of container events dropped", registry=REGISTRY))

# imaged: what is downloaded, and what is not because the store has it.
CRIO_IMAGE_PULLS_BYTES = _crio("imaged", Counter(
    CRIO_PREFIX + "image_pulls_bytes_total", "Bytes transferred by CRI-O image pulls",
    ["mediatype", "size"], registry=REGISTRY))
CRIO_IMAGE_PULLS_SKIPPED_BYTES = _crio("imaged", Counter(
    CRIO_PREFIX + "image_pulls_skipped_bytes_total", "Bytes skipped by CRI-O image pulls",
    ["size"], registry=REGISTRY))
CRIO_IMAGE_PULLS_LAYER_SIZE = _crio("imaged", Histogram(
    CRIO_PREFIX + "image_pulls_layer_size", "Bytes transferred by CRI-O image pulls per layer",
    buckets=(1e3, 1e6, 1e7, 5e7, 1e8, 2e8, 3e8, 4e8, 5e8, 1e9, 1e10), registry=REGISTRY))
CRIO_IMAGE_LAYER_REUSE = _crio("imaged", Counter(
    CRIO_PREFIX + "image_layer_reuse_total", "Reused (not pulled) local image layer count by name",
    ["name"], registry=REGISTRY))

# runtimed: OOM kills, in all and by container name (the name's series goes with the container).
CRIO_CONTAINERS_OOM = _crio("runtimed", Counter(
    CRIO_PREFIX + "containers_oom_total", "Amount of containers killed because they ran out of memory (OOM)",
    registry=REGISTRY))
CRIO_CONTAINERS_OOM_COUNT = _crio("runtimed", Counter(
    CRIO_PREFIX + "containers_oom_count_total",
    "Amount of containers killed because they ran out of memory (OOM) by their name",
    ["name"], registry=REGISTRY))

CRIO_CONTAINERS_STOPPED_MONITOR = _crio("runtimed", Counter(
    CRIO_PREFIX + "containers_stopped_monitor_count",
    "Amount of containers whose monitor process has exited by their name", ["name"], registry=REGISTRY))

# frontend: a retried RunPodSandbox or CreateContainer that finds the first request's
# creation still running, by the step it is at (netd's CNI ADD, storaged's rootfs...).
CRIO_RESOURCES_STALLED = _crio("frontend", Counter(
    CRIO_PREFIX + "resources_stalled_at_stage", "Resource creation stage pod or container is stalled at.",
    ["stage"], registry=REGISTRY))
