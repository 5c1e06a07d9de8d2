"""Every service's bus API in one table: its methods, whether each is safe to retry, who may call it.

The services implement their row (a service whose class does not implement
exactly the methods listed here refuses to start); callers read it: the
frontend learns which calls it may retry, and the `criopy` command whom to
ask, without importing any daemon's code.

`callers` names the processes allowed to call a method: FRONTEND (the only
caller of the daemons) and ROOT (uid 0 outside every service: the `criopy`
command's status, reload and restart, which only the supervisor answers). It
is the architecture's table of edges, method by method:

    frontend -> storaged, imaged, netd, runtimed (every method, their events, their streams)
    root     -> supervisor
    nothing else: no daemon calls another, nobody calls the frontend over the bus

Every server checks each request against it, with the caller's credentials
taken from the connection (shared/bus/peers.py); shared/identities.py says
which credentials are whose.
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

    @property
    def callers(self) -> frozenset[str]:
        """Who may call at least one of its methods; a service nobody calls binds no bus socket."""
        return frozenset().union(*(info.callers for info in self.methods.values()))


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
    # The frontend asks their health (the CRI's Status) and scrapes their metrics.
    return _service(name, methods, health_callers=(FRONTEND,), metrics_callers=(FRONTEND,), **facts)


# Who may subscribe to a daemon's events and open its byte streams.
SUBSCRIBERS: frozenset[str] = frozenset({FRONTEND})
STREAM_CALLERS: frozenset[str] = frozenset({FRONTEND})


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

# Its images' changes go to the frontend's read model (shared/bus/feed.py), on its event socket.
IMAGED = _daemon("imaged", publishes_events=True, methods={
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
    "snapshot": retried(FRONTEND),
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

# Container and pod events go to the frontend (GetContainerEvents); see runtimed's event_publisher.py;
# and so do the changes its read model follows (shared/bus/feed.py, `snapshot`).
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
    "snapshot": retried(FRONTEND),
})

# Nobody calls the frontend over the bus: the supervisor learns its state from
# the process itself (shared/notify.py, /proc), and it binds no bus socket.
FRONTEND_API = _service("frontend", {}, health_callers=(), metrics_callers=())

# `criopy run`'s supervisor: the `criopy` command's status, reload and restart.
SUPERVISOR = _service("supervisor", health_callers=(ROOT,), metrics_callers=(ROOT,), methods={
    "services": retried(ROOT),
    "reload": once(ROOT),
    "restart": once(ROOT),
})

API: dict[str, ServiceApi] = {api.name: api for api in (STORAGED, IMAGED, NETD, RUNTIMED, FRONTEND_API, SUPERVISOR)}
