"""Prometheus metrics: every process fills its own registry, the frontend serves them all.

Each service answers the bus method `metrics` with its registry in the text
exposition format; the frontend's endpoint fetches all five, labels every
sample with its `service` and serves them as one page. One endpoint covers the
five processes (and storaged, which has no network at all, can still be
scraped), and a daemon that is down shows as `criopy_service_up 0`.

Metric names follow Prometheus conventions and CRI-O's where one exists
(`crio_operations_total` becomes `criopy_operations_total`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, process_cpu_seconds_total...

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

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

# imaged
IMAGE_PULLS = Counter(
    "criopy_image_pulls_total", "Image pulls, by outcome (success or the failure's reason).",
    ["outcome"], registry=REGISTRY)
IMAGE_PULL_BYTES = Counter(
    "criopy_image_pulls_bytes_total", "Bytes downloaded from registries.", registry=REGISTRY)
IMAGE_PULL_DURATION = Histogram(
    "criopy_image_pulls_duration_seconds", "Duration of image pulls.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=REGISTRY)

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


def exposition() -> str:
    return generate_latest(REGISTRY).decode()
