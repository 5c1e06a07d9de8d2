"""Prometheus metrics: every process fills its own registry, the frontend serves them all.

Each service answers the bus method `metrics` with its registry in the text
exposition format; the frontend's endpoint fetches all five, labels every
sample with its `service` and serves them as one page. One endpoint covers the
five processes (and storaged, which has no network at all, can still be
scraped), and a daemon that is down shows as `criopy_service_up 0`.

Two sets of families live here:

- crio-py's own (`criopy_*`), with the labels crio-py finds useful
  (`operation` and `code`, `daemon`...).
- CRI-O's (`container_runtime_crio_*`), with CRI-O's names, types, help,
  labels and buckets, so that dashboards and alerts written for CRI-O read
  crio-py unchanged. Each is filled by the one process that has its meaning
  (`CRIO_OWNERS`); the merged page takes it from that process alone and
  leaves out the `service` label, so its series look exactly like CRI-O's.

Metrics are off by default, as in CRI-O (`[crio.metrics] enable_metrics`).
Until `enable()` runs (at a service's start, or when a reload turns metrics on)
every family is a stand-in that takes updates and keeps nothing. Counting
starts then. prometheus_client is not loaded at all until then: its package
imports HTTP, e-mail and compression modules, several MiB in every process
(shared/metric_families.py).
"""

from __future__ import annotations

import os
from typing import Any


class _Off:
    """A family while metrics are off: every update is taken and nothing is kept."""

    def labels(self, *values: object, **named: object) -> "_Off":
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, *value: object) -> None:
        pass

    def remove(self, *values: object) -> None:
        pass


_OFF: Any = _Off()
REGISTRY: Any = None
CRIO_PREFIX = "container_runtime_crio_"
# Family name (as a parsed exposition page names it) -> the one service that fills it; filled by enable().
CRIO_OWNERS: dict[str, str] = {}
SERVICE_RESTARTS: Any = _OFF
BUS_REFUSED: Any = _OFF
OPERATIONS: Any = _OFF
OPERATION_LATENCY: Any = _OFF
BUS_CALLS: Any = _OFF
BUS_CALL_LATENCY: Any = _OFF
READ_MODEL_SYNCS: Any = _OFF
IMAGE_PULLS: Any = _OFF
IMAGE_PULL_BYTES: Any = _OFF
IMAGE_PULL_DURATION: Any = _OFF
STATE_RECORDS_QUARANTINED: Any = _OFF
CONTAINERS: Any = _OFF
PODS: Any = _OFF
OOM_KILLS: Any = _OFF
CNI_CALL_LATENCY: Any = _OFF
CRIO_OPERATIONS: Any = _OFF
CRIO_OPERATIONS_ERRORS: Any = _OFF
CRIO_OPERATIONS_LATENCY: Any = _OFF
CRIO_OPERATIONS_LATENCY_TOTAL: Any = _OFF
CRIO_IMAGE_PULLS_SUCCESS: Any = _OFF
CRIO_IMAGE_PULLS_FAILURE: Any = _OFF
CRIO_CONTAINERS_EVENTS_DROPPED: Any = _OFF
CRIO_IMAGE_PULLS_BYTES: Any = _OFF
CRIO_IMAGE_PULLS_SKIPPED_BYTES: Any = _OFF
CRIO_IMAGE_PULLS_LAYER_SIZE: Any = _OFF
CRIO_IMAGE_LAYER_REUSE: Any = _OFF
CRIO_CONTAINERS_OOM: Any = _OFF
CRIO_CONTAINERS_OOM_COUNT: Any = _OFF
CRIO_CONTAINERS_STOPPED_MONITOR: Any = _OFF
CRIO_RESOURCES_STALLED: Any = _OFF


def enabled() -> bool:
    return REGISTRY is not None


def enable() -> None:
    """Turn metrics on in this process: the registry and every family, from now on (once)."""
    global REGISTRY
    if REGISTRY is not None:
        return
    from shared import metric_families

    # Every stand-in above is replaced by the family of its name.
    stand_ins = [name for name, value in globals().items() if value is _OFF and not name.startswith("_")]
    globals().update({name: getattr(metric_families, name) for name in stand_ins})
    CRIO_OWNERS.update(metric_families.CRIO_OWNERS)
    _children.clear()
    REGISTRY = metric_families.REGISTRY




# Computed by the frontend's endpoint on each scrape (a walk of /proc), not kept in a registry.
CRIO_PROCESSES_DEFUNCT = (CRIO_PREFIX + "processes_defunct", "Total number of defunct processes in the node")


_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def labelled(family: Counter | Gauge | Histogram, *values: str) -> Any:
    """`family.labels(*values)`, looked up once: labels() checks and locks on every call, and the
    per-call families are touched several times by every CRI call. Not for families whose
    series are removed (the kept child would outlive its removal)."""
    key = (family, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = family.labels(*values)
    return child


def observe_operation(operation: str, code: str, seconds: float) -> None:
    """A CRI call answered with `code` ("OK" or a gRPC code name) after `seconds`."""
    labelled(OPERATIONS, operation, code).inc()
    labelled(OPERATION_LATENCY, operation).observe(seconds)
    labelled(CRIO_OPERATIONS, operation).inc()
    labelled(CRIO_OPERATIONS_LATENCY, operation).set(seconds)
    CRIO_OPERATIONS_LATENCY_TOTAL.observe(operation, seconds)
    if code != "OK":
        labelled(CRIO_OPERATIONS_ERRORS, operation).inc()


_SIZE_BUCKETS = ((10e9, ">10 GiB"), (1e9, ">1 GiB"), (500e6, ">500 MiB"), (400e6, ">400 MiB"),
                 (300e6, ">300 MiB"), (200e6, ">200 MiB"), (100e6, ">100 MiB"), (50e6, ">50 MiB"),
                 (10e6, ">10 MiB"), (1e6, ">1 MiB"), (1e3, ">1 KiB"))


def size_bucket(size: float) -> str:
    """CRI-O's `size` label: the largest of its thresholds that `size` exceeds (names as CRI-O spells them)."""
    return next((name for limit, name in _SIZE_BUCKETS if size > limit), ">0 B")


def blob_downloaded(media_type: str, size: int) -> None:
    IMAGE_PULL_BYTES.inc(size)
    CRIO_IMAGE_PULLS_BYTES.labels(media_type, size_bucket(size)).inc(size)
    CRIO_IMAGE_PULLS_LAYER_SIZE.observe(size)


def layer_reused(image: str, digest: str, size: int) -> None:
    CRIO_IMAGE_LAYER_REUSE.labels(f"{image}@{digest}").inc()
    CRIO_IMAGE_PULLS_SKIPPED_BYTES.labels(size_bucket(size)).inc(size)


def image_pull_failure_reason(code: str, message: str) -> str:
    """CRI-O's `error` label for a failed pull: the registry's error code where one is known.

    Like CRI-O, it reads the error's message; only phrases with spaces or
    capitals are looked for, which no image reference can hold.
    """
    if code == "UNAUTHENTICATED":
        return "UNAUTHORIZED"
    if code == "PERMISSION_DENIED":
        return "DENIED"
    if "HTTP 429" in message:
        return "TOOMANYREQUESTS"
    if "Connection refused" in message or "connection refused" in message:
        return "CONNECTION_REFUSED"
    if "timed out" in message or "Timeout:" in message:
        return "CONNECTION_TIMEOUT"
    if code == "NOT_FOUND":
        if ": manifest " in message:
            return "MANIFEST_UNKNOWN"
        return "BLOB_UNKNOWN" if ": layer " in message or ": config " in message else "NOT_FOUND"
    return "UNKNOWN"


def container_oom_killed(name: str) -> None:
    OOM_KILLS.inc()
    CRIO_CONTAINERS_OOM.inc()
    CRIO_CONTAINERS_OOM_COUNT.labels(name).inc()


def container_removed(name: str) -> None:
    """A removed container's OOM series goes too, as in CRI-O (it keeps the label set small)."""
    try:
        CRIO_CONTAINERS_OOM_COUNT.remove(name)
    except KeyError:
        pass


def exposition() -> str:
    """This process's metrics in the text format; empty while they are off."""
    if REGISTRY is None:
        return ""
    from prometheus_client import generate_latest

    return generate_latest(REGISTRY).decode()


def defunct_processes(proc: str = "/proc") -> int:
    """Zombie processes on the node: those whose state in /proc/<pid>/stat is Z. Blocks; run it in a thread."""
    count = 0
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # The state follows the command name, which is in parentheses and may hold any byte.
        if stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] == b"Z":
            count += 1
    return count
