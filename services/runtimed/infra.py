"""A pod's infra process: catatonit as the init of a PID namespace the pod's containers join.

Only pods that share one PID namespace among their containers have one. It
runs from a tiny root file system of its own, under conmon like a container.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from typing import Any

import structlog

from services.runtimed import conmon, exits, oci_annotations, process, spec
from services.runtimed.context import Context
from services.runtimed.disk_cleanup import unlink_quiet
from services.runtimed.records import SANDBOXES
from shared.errors import FailedPrecondition, Internal, NotFound

log = structlog.get_logger(__name__)

# How long a killed infra process may take before its exit file appears.
EXIT_WAIT = 10.0


def alive(rec: dict[str, Any]) -> bool:
    infra = rec.get("infra") or {}
    pid = infra.get("pid")
    return bool(pid) and process.still_running(pid, infra.get("pid_start"))


def refresh(rec: dict[str, Any]) -> bool:
    """Mark a ready pod whose infra process died: it is then reported NOTREADY. Whether it was marked now."""
    if rec.get("infra") and rec["state"] == "ready" and not rec.get("infra_exited") and not alive(rec):
        log.warning("sandbox_infra_exited", sandbox_id=rec["id"])
        rec["infra_exited"] = True
        return True
    return False


def check(ctx: Context, rec: dict[str, Any]) -> None:
    """`refresh`, and a pod found NOTREADY now goes to the read model (the mark is not saved)."""
    if refresh(rec):
        ctx.records.touched(SANDBOXES, rec)


def facts(rec: dict[str, Any]) -> spec.SandboxFacts:
    """What a container's spec needs to know of its pod."""
    infra = rec.get("infra")
    pid_ns = None
    if infra:
        if not alive(rec):
            raise FailedPrecondition(f"the infra process of pod sandbox {rec['id']} is not running")
        pid_ns = f"/proc/{infra['pid']}/ns/pid"
    return spec.SandboxFacts(
        id=rec["id"], cgroup_parent=rec["cgroup_parent"], hostname=rec.get("hostname", ""),
        netns_path=rec.get("netns_path"), network_mode=rec.get("network_mode", "POD"),
        ipc_mode=rec.get("ipc_mode", "POD"), ipc_ns_path=rec.get("ipc_ns_path"),
        uts_ns_path=rec.get("uts_ns_path"), pid_ns_path=pid_ns, hosts_path=rec.get("hosts_path"),
        resolv_path=rec.get("resolv_path"), hostname_path=rec.get("hostname_path"),
        shm_path=rec.get("shm_path"), privileged=bool(rec.get("privileged")))


def _rootfs(ctx: Context) -> str:
    """The infra processes' root file system, made once: catatonit and the directories it needs."""
    root = os.path.join(ctx.state_dir, "infra-rootfs")
    binary = os.path.join(root, "catatonit")
    if not os.path.exists(binary):
        os.makedirs(root, exist_ok=True)
        for d in ("proc", "dev", "sys"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        source = ctx.rc.infra_command
        if not os.path.isfile(source):
            raise FailedPrecondition(f"the infra command {source} does not exist")
        # Pods started together may all make it: each copies to a name of its own, the last rename wins.
        tmp = f"{binary}.{secrets.token_hex(4)}.tmp"
        try:
            shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, binary)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return root


async def start(ctx: Context, rec: dict[str, Any]) -> None:
    """Run the pod's init (catatonit) in a new PID namespace the containers then join."""
    bundle = os.path.join(rec["dir"], "infra")
    os.makedirs(bundle, exist_ok=True)
    rootfs = await asyncio.to_thread(_rootfs, ctx)
    infra_spec = spec.infra_spec(sandbox_id=rec["id"], rootfs=rootfs, command="/catatonit",
                                 sandbox=facts(rec), systemd_cgroup=ctx.systemd)
    infra_spec["annotations"].update(oci_annotations.of_sandbox(rec))
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(infra_spec, f)
    rec["infra"] = {"bundle": bundle, "pid": 0}
    await ctx.records.save_sandbox(rec)
    runc = ctx.runc(rec)
    handler = ctx.handler(rec["runtime_handler"])
    started = await conmon.start(conmon.ConmonSpec(
        container_id=rec["id"], name=rec["name"], bundle=bundle, log_path=os.path.join(rec["dir"], "infra.log"),
        exit_dir=ctx.exit_dir, socket_dir=ctx.attach_dir, persist_dir=os.path.join(bundle, "persist"),
        runc=runc, monitor_path=handler.monitor_path,
        log_level=ctx.rc.log_level, systemd_cgroup=ctx.systemd), timeout=handler.container_create_timeout)
    rec["infra"].update(pid=started.container_pid, pid_start=process.process_start_time(started.container_pid),
                        conmon_pid=started.conmon_pid, conmon_start=process.process_start_time(started.conmon_pid))
    await ctx.records.save_sandbox(rec, durable=False)
    await runc.start(rec["id"], init_pid=rec["infra"]["pid"], init_start=rec["infra"]["pid_start"])


async def stop(ctx: Context, rec: dict[str, Any], *, delete: bool) -> None:
    """Kill the infra process; with `delete`, remove its runc container and conmon's files too."""
    infra = rec.get("infra")
    if not infra:
        return
    runc = ctx.runc(rec)
    if alive(rec):
        try:
            await runc.kill(rec["id"], "KILL", all_processes=True)
        except (NotFound, Internal) as e:
            log.warning("infra_kill_failed", sandbox_id=rec["id"], error=str(e))
        await exits.wait_exit_file(ctx, rec["id"], EXIT_WAIT)
    if delete:
        await runc.delete(rec["id"], force=True)
        await conmon.wait_gone(infra.get("conmon_pid"), infra.get("conmon_start"))
        unlink_quiet(os.path.join(ctx.exit_dir, rec["id"]))
        unlink_quiet(os.path.join(ctx.attach_dir, rec["id"]))
