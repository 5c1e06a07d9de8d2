"""Making a reserved pod: its directories, /etc files, IPC and UTS namespaces, /dev/shm, cgroup and infra process.

Two calls, so that the part that does not need the pod's network runs while
netd attaches it: `prepare` makes the directories, hostname and resolv.conf,
the pinned IPC and UTS namespaces, /dev/shm and the cgroup; `create`, given
the network namespace and the pod's IPs, writes /etc/hosts and the net.*
sysctls, starts the infra process when there is one, and marks the pod
ready (doing the preparation itself when nobody asked for it first).

A pod stays reserved while prepared: a retry that takes the reservation over
prepares it again, and `release` undoes it. Each step is undone by
`teardown` when a later one fails (and at start, for a creation cut off by a
restart); every undo step tolerates the absence of what it removes.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import structlog

from services.runtimed import cgroups, infra, namespaces, podfiles, spec_values
from services.runtimed.context import Context
from services.runtimed.disk_cleanup import rmtree_unmounting, unmount_quiet
from services.runtimed.records import SANDBOX_STATES, SANDBOXES
from shared import faults
from shared.errors import FailedPrecondition, Internal, InvalidArgument
from shared.mounts import MS_NODEV, MS_NOEXEC, MS_NOSUID, mount

log = structlog.get_logger(__name__)

DEFAULT_CGROUP_PARENT = "/criopy"
SHM_SIZE = "65536k"


async def prepare(ctx: Context, sandbox_id: str) -> dict[str, Any]:
    """Make what the reserved pod needs before its network: directories, files, namespaces, shm, cgroup."""
    rec = ctx.records.sandbox(sandbox_id)
    async with ctx.records.lock(rec["id"]):
        if (made := _made_or_reserved(rec)) is None:
            await _prepare(ctx, rec)
    return made or {"id": rec["id"], "state": "reserved"}


def _made_or_reserved(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The answer for a pod already made (a retried call); None for one still reserved; otherwise an error."""
    if rec["state"] in SANDBOX_STATES:
        return {"id": rec["id"], "state": SANDBOX_STATES[rec["state"]]}
    if rec["state"] != "reserved":
        raise FailedPrecondition(f"pod sandbox {rec['id']} is {rec['state']}")
    return None


async def create(ctx: Context, sandbox_id: str, netns_path: str | None, ips: list | None) -> dict[str, Any]:
    """Make the reserved pod: what `prepare` makes (unless done), hosts, net sysctls, infra process."""
    records = ctx.records
    rec = records.sandbox(sandbox_id)
    async with records.lock(rec["id"]):
        if (made := _made_or_reserved(rec)) is not None:
            return made
        if netns_path is not None and not os.path.exists(netns_path):
            raise InvalidArgument(f"network namespace {netns_path} does not exist")
        rec.update(state="creating", netns_path=netns_path, ips=list(ips or []))
        await records.save_sandbox(rec)
        faults.point("runtimed.create_sandbox.after_record")
        try:
            await _prepare(ctx, rec)
            await _finish(ctx, rec)
        except BaseException:
            await teardown(ctx, rec, remove=True)
            await records.back_to_reserved(SANDBOXES, rec)
            raise
        rec["state"] = "ready"
        rec["created_at"] = time.time_ns()
        await records.save_sandbox(rec)
    await records.notify()
    ctx.events.emit("sandbox", "created", rec["id"], rec["id"])
    log.info("sandbox_created", sandbox_id=rec["id"], name=rec["name"])
    return {"id": rec["id"], "state": "SANDBOX_READY"}


async def release(ctx: Context, sandbox_id: str) -> dict[str, Any]:
    """Undo a reservation whose RunPodSandbox failed; a finished pod is left alone."""
    await ctx.records.release(SANDBOXES, sandbox_id, lambda rec: teardown(ctx, rec, remove=True))
    return {}


def _sysctls(ctx: Context, linux: dict[str, Any], *, host_ipc: bool, host_network: bool) -> dict[str, str]:
    """The configured default sysctls, overridden by the pod's, checked."""
    sysctls = {}
    for item in ctx.rc.default_sysctls:
        key, _, value = item.partition("=")
        sysctls[key.strip()] = value.strip()
    sysctls.update(linux.get("sysctls") or {})
    return namespaces.check_sysctls(sysctls, host_ipc=host_ipc, host_network=host_network)


async def _prepare(ctx: Context, rec: dict[str, Any]) -> None:
    """Make the pod's directories, files, namespaces, shm and cgroup, unless done already;
    what a preparation cut off earlier left is removed first, and a failure undoes it all."""
    if rec["id"] in ctx.prepared:
        return
    if rec.get("dir"):
        await teardown(ctx, rec, remove=True)
    try:
        await _setup(ctx, rec)
    except BaseException:
        await teardown(ctx, rec, remove=True)
        raise
    ctx.prepared.add(rec["id"])


async def _setup(ctx: Context, rec: dict[str, Any]) -> None:
    cfg = rec["config"]
    linux = cfg.get("linux") or {}
    sc = linux.get("security_context") or {}
    ns = sc.get("namespace_options") or {}
    net_mode = spec_values.ns_mode(ns, "network")
    ipc_mode = spec_values.ns_mode(ns, "ipc")
    pid_mode = spec_values.ns_mode(ns, "pid")
    host_network = net_mode == "NODE"
    pod_dir, run_dir = ctx.sandbox_paths(rec["id"])
    if host_network:
        hostname = os.uname().nodename
    else:
        hostname = podfiles.check_hostname(cfg.get("hostname") or rec["id"][:12])
    log_directory = cfg.get("log_directory") or os.path.join(ctx.config.crio.log_dir, rec["id"])
    if not os.path.isabs(log_directory):
        raise InvalidArgument(f"log_directory must be absolute: {log_directory!r}")
    sysctls = _sysctls(ctx, linux, host_ipc=ipc_mode == "NODE", host_network=host_network)
    parent = linux.get("cgroup_parent") or DEFAULT_CGROUP_PARENT
    cgroups_made: list[str] = []
    if ctx.systemd:
        if not parent.endswith(".slice"):
            raise InvalidArgument(f"cgroup parent for the systemd driver must be a .slice: {parent!r}")
    else:
        parent = cgroups.check_parent(parent)
        cgroups_made = cgroups.missing(parent)
    # Everything this makes is recorded before it is made, so that an undo (or the start
    # after a crash) knows what to remove.
    rec.update(
        dir=pod_dir, run_dir=run_dir, hostname=hostname, log_directory=log_directory,
        network_mode=net_mode, ipc_mode=ipc_mode, pid_mode=pid_mode,
        privileged=bool(sc.get("privileged")),
        hostname_path=os.path.join(pod_dir, "hostname"),
        hosts_path=os.path.join(pod_dir, "hosts"),
        resolv_path=os.path.join(pod_dir, "resolv.conf"),
        ipc_ns_path=None if ipc_mode == "NODE" else os.path.join(run_dir, "ipcns"),
        uts_ns_path=None if host_network else os.path.join(run_dir, "utsns"),
        shm_path=None if ipc_mode == "NODE" else os.path.join(run_dir, "shm"),
        sysctls=sysctls, infra=None, cgroup_parent=parent, cgroups_made=cgroups_made,
    )
    await ctx.records.save_sandbox(rec)
    os.makedirs(pod_dir, mode=0o755, exist_ok=True)
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    podfiles.write_hostname(rec["hostname_path"], hostname)
    podfiles.write_resolv(rec["resolv_path"], cfg.get("dns_config"))
    os.makedirs(log_directory, mode=0o755, exist_ok=True)
    await namespaces.pin(ipc_path=rec["ipc_ns_path"], uts_path=rec["uts_ns_path"], hostname=hostname,
                         sysctls=sysctls)
    faults.point("runtimed.create_sandbox.after_namespaces")
    if rec["shm_path"]:
        os.makedirs(rec["shm_path"], mode=0o755, exist_ok=True)
        try:
            mount("shm", rec["shm_path"], "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"mode=1777,size={SHM_SIZE}")
        except OSError as e:
            raise Internal(f"mounting the pod's /dev/shm: {e}") from None
    if not ctx.systemd:
        cgroups.create(parent)


async def _finish(ctx: Context, rec: dict[str, Any]) -> None:
    """What needs the pod's network: /etc/hosts with its IPs, net.* sysctls, and the infra process."""
    host_network = rec["network_mode"] == "NODE"
    if not host_network and not rec.get("netns_path"):
        log.info("sandbox_without_netns", sandbox_id=rec["id"])
    podfiles.write_hosts(rec["hosts_path"], rec["hostname"], rec.get("ips") or [], host_network=host_network)
    await namespaces.set_net_sysctls(rec.get("netns_path"), rec["sysctls"])
    if rec["pid_mode"] == "POD":
        await infra.start(ctx, rec)
        faults.point("runtimed.create_sandbox.after_infra")


async def _hand_over_cgroups(ctx: Context, rec: dict[str, Any], busy: list[str]) -> list[str]:
    """Cgroup directories this pod made that other pods still use (pods sharing one parent, as the
    kubelet's without QoS cgroups do): each of those pods takes them over, and the last to go removes
    them. What no other pod uses is returned, left in use by something else."""
    left = []
    for directory in busy:
        heirs = [other for other in ctx.records.sandboxes.values()
                 if other["id"] != rec["id"] and other.get("cgroup_parent")
                 and any(d == directory or d.startswith(directory + "/")
                         for d in cgroups.controller_dirs(other["cgroup_parent"]))]
        for heir in heirs:
            made = heir.setdefault("cgroups_made", [])
            if directory not in made:
                made.append(directory)
                await ctx.records.save_sandbox(heir)
        if not heirs:
            left.append(directory)
    return left


async def teardown(ctx: Context, rec: dict[str, Any], *, remove: bool) -> None:
    """Undo what creation made (all of it when `remove`, else only what runs); every step tolerates absence."""
    if remove:
        ctx.prepared.discard(rec["id"])
    try:
        await infra.stop(ctx, rec, delete=remove)
    except Exception as e:
        log.warning("infra_stop_failed", sandbox_id=rec["id"], error=str(e))
    if rec.get("shm_path"):
        unmount_quiet(rec["shm_path"])
    if not remove:
        return
    for key in ("ipc_ns_path", "uts_ns_path"):
        namespaces.unpin(rec.get(key))
    busy = await cgroups.remove_dirs(rec.get("cgroups_made") or [])
    left = await _hand_over_cgroups(ctx, rec, busy)
    if left:
        log.warning("sandbox_cgroups_left", sandbox_id=rec["id"], dirs=left)
    pod_dir, run_dir = ctx.sandbox_paths(rec["id"])
    for d in (run_dir, pod_dir):
        await asyncio.to_thread(rmtree_unmounting, d)
