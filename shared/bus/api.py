"""Every service's bus API in one table: its methods, whether each is safe to retry, who may call it.

The services implement their row (a service whose class does not implement
exactly the methods listed here refuses to start); callers read it: the
frontend learns which calls it may retry, and the `criopy` command whom to
ask, without importing any daemon's code.

`callers` names the processes allowed to call a method: FRONTEND (the only
caller of the daemons' work) and ROOT (uid 0: the `criopy` command's status,
reload and restart). It is the architecture's table of edges, method by
method, for a server to check against the caller's credentials (SO_PEERCRED)
once each process runs as a user of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

FRONTEND = "frontend"
ROOT = "root"
CALLERS: frozenset[str] = frozenset({FRONTEND, ROOT})


@dataclass(frozen=True)
class MethodInfo:
    """What a caller must know of one bus method."""

    # Safe to repeat when the daemon was restarting and its reply was lost.
    idempotent: bool
    callers: frozenset[str]

    def __post_init__(self) -> None:
        unknown = self.callers - CALLERS
        if unknown:
            raise ValueError(f"unknown callers {sorted(unknown)} (known: {sorted(CALLERS)})")


@dataclass(frozen=True)
class ServiceApi:
    name: str
    methods: Mapping[str, MethodInfo]
    # False: the service runs without any network (its spans are relayed by the frontend).
    network: bool = True
    # Whether the service publishes events, on the configuration's events endpoint of its name.
    publishes_events: bool = False
    # Whether the service streams bytes (exec, attach, port-forward) on a socket of its own.
    serves_streams: bool = False


def retried(*callers: str) -> MethodInfo:
    """An idempotent method: the frontend retries it, with backoff, until the caller's deadline."""
    return MethodInfo(idempotent=True, callers=frozenset(callers))


def once(*callers: str) -> MethodInfo:
    """A method that must not run twice: retried only when the request was never delivered."""
    return MethodInfo(idempotent=False, callers=frozenset(callers))


def _service(name: str, methods: dict[str, MethodInfo], *, health_callers: tuple[str, ...],
             metrics_callers: tuple[str, ...], **facts: bool) -> ServiceApi:
    """A row of the table: the methods every service answers (see shared/bus/service.py), then its own."""
    common = {"health": retried(*health_callers), "metrics": retried(*metrics_callers)}
    return ServiceApi(name, {**common, **methods}, **facts)


def _daemon(name: str, methods: dict[str, MethodInfo], **facts: bool) -> ServiceApi:
    # `criopy status` asks each service's health itself; the frontend scrapes their metrics.
    return _service(name, methods, health_callers=(FRONTEND, ROOT), metrics_callers=(FRONTEND,), **facts)


# It reads blobs and writes layers: no network at all.
STORAGED = _daemon("storaged", network=False, methods={
    "unpack": retried(FRONTEND),
    "release_layers": retried(FRONTEND),
    "layer_status": retried(FRONTEND),
    "unpacked_sizes": retried(FRONTEND),
    "list_layers": retried(FRONTEND),
    "gc_layers": retried(FRONTEND),
    "create_rootfs": retried(FRONTEND),
    "remove_rootfs": retried(FRONTEND),
    "rootfs_status": retried(FRONTEND),
    "list_rootfs": retried(FRONTEND),
    "fs_info": retried(FRONTEND),
    "rootfs_usage": retried(FRONTEND),
    "rootfs_usages": retried(FRONTEND),
})

IMAGED = _daemon("imaged", methods={
    "pull": retried(FRONTEND),
    "pull_progress": retried(FRONTEND),
    "mark_ready": retried(FRONTEND),
    "abandon": retried(FRONTEND),
    "layer_blobs": retried(FRONTEND),
    "set_top_layer": retried(FRONTEND),
    "image_status": retried(FRONTEND),
    "list_images": retried(FRONTEND),
    "remove_image": retried(FRONTEND),
    "top_layers": retried(FRONTEND),
    "fs_info": retried(FRONTEND),
})

# Port-forward connections stream their bytes on a socket of their own (netd's port_forward.py).
NETD = _daemon("netd", serves_streams=True, methods={
    "attach": retried(FRONTEND),
    "detach": retried(FRONTEND),
    "pod_network": retried(FRONTEND),
    "list_pod_networks": retried(FRONTEND),
    "check_pod_network": retried(FRONTEND),
    "pod_network_stats": retried(FRONTEND),
    "update_pod_cidr": retried(FRONTEND),
    "pf_open": once(FRONTEND),
})

# Container and pod events go to the frontend (GetContainerEvents); see runtimed's event_publisher.py.
# Exec and attach stream their bytes on a socket of their own (runtimed's exec_session.py).
RUNTIMED = _daemon("runtimed", publishes_events=True, serves_streams=True, methods={
    "runtime_config": retried(FRONTEND),
    "runtime_version": retried(FRONTEND),
    "reserve_sandbox": retried(FRONTEND),
    "prepare_sandbox": retried(FRONTEND),
    "create_sandbox": retried(FRONTEND),
    "release_sandbox": retried(FRONTEND),
    "stop_sandbox": retried(FRONTEND),
    "remove_sandbox": retried(FRONTEND),
    "sandbox_status": retried(FRONTEND),
    "list_sandboxes": retried(FRONTEND),
    "reserve_container": retried(FRONTEND),
    "create_container": retried(FRONTEND),
    "release_container": retried(FRONTEND),
    "take_over_reservations": retried(FRONTEND),
    "record_ids": retried(FRONTEND),
    "start_container": once(FRONTEND),
    "stop_container": retried(FRONTEND),
    "remove_container": retried(FRONTEND),
    "container_status": retried(FRONTEND),
    "list_containers": retried(FRONTEND),
    "exec_sync": once(FRONTEND),
    "reopen_log": retried(FRONTEND),
    "update_resources": retried(FRONTEND),
    "update_sandbox_resources": retried(FRONTEND),
    "list_container_stats": retried(FRONTEND),
    "list_sandbox_stats": retried(FRONTEND),
    "metric_samples": retried(FRONTEND),
    "checkpoint_container": once(FRONTEND),
    "exec_start": once(FRONTEND),
    "attach_start": once(FRONTEND),
})

# The frontend answers only what every service answers, for `criopy status`.
FRONTEND_API = _service("frontend", {}, health_callers=(ROOT,), metrics_callers=(ROOT,))

# `criopy run`'s supervisor: the frontend reads restart counts for its metrics.
SUPERVISOR = _service("supervisor", health_callers=(ROOT,), metrics_callers=(ROOT,), methods={
    "services": retried(ROOT, FRONTEND),
    "reload": once(ROOT),
    "restart": once(ROOT),
})

API: dict[str, ServiceApi] = {api.name: api for api in (STORAGED, IMAGED, NETD, RUNTIMED, FRONTEND_API, SUPERVISOR)}
