"""Making a reserved container: its OCI spec and bundle, then conmon, which runs `runc create`.

A creation that fails (or that a restart cut off) is undone by `undo`: the
runc container, conmon, the bundle and conmon's cgroup go, and the container
is back to reserved.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal as signals
import time
from typing import Any

import structlog

from services.runtimed import cgroups, conmon, container_remove, infra, oci_annotations, process, spec, spec_values
from services.runtimed.context import Context
from services.runtimed.paths import confined_relative
from services.runtimed.records import CONTAINER_STATES, CONTAINERS
from shared import faults
from shared.errors import FailedPrecondition

log = structlog.get_logger(__name__)


def _signal_name(value: str | None) -> str:
    """A signal name runc accepts; the image's STOPSIGNAL or SIGTERM."""
    if not value:
        return "TERM"
    text = str(value).strip().upper()
    if text.isdigit():
        return text
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signals.Signals[text].name[3:]
    except KeyError:
        if text.startswith("SIGRTMIN") or text.startswith("SIGRTMAX"):
            return text[3:]
        return "TERM"


def _log_path(ctx: Context, sb: dict[str, Any], cfg: dict[str, Any]) -> str:
    log_directory = sb.get("log_directory") or os.path.join(ctx.config.crio.log_dir, sb["id"])
    meta = cfg.get("metadata") or {}
    rel = cfg.get("log_path") or f"{meta.get('name')}_{int(meta.get('attempt') or 0)}.log"
    rel = confined_relative(rel, "log_path")
    return os.path.join(log_directory, rel)


def _target_pid_ns(ctx: Context, sb: dict[str, Any], ns_opts: dict[str, Any]) -> str | None:
    """The PID namespace of the target container, for a container that shares it (TARGET mode)."""
    if spec_values.ns_mode(ns_opts, "pid") != "TARGET":
        return None
    target = ctx.records.container(ns_opts.get("target_id", ""), visible=True)
    if target["sandbox_id"] != sb["id"] or target["state"] != "running":
        raise FailedPrecondition("the target container must be running in the same pod")
    return f"/proc/{target['pid']}/ns/pid"


def _conmon_cgroup_path(ctx: Context, rec: dict[str, Any], sb: dict[str, Any]) -> str | None:
    """The cgroup conmon joins: <pod cgroup>/crio-conmon-<id>, or the configured path."""
    if ctx.systemd:
        return None
    setting = ctx.rc.conmon_cgroup
    if setting == "pod":
        return f"{sb['cgroup_parent'].rstrip('/')}/crio-conmon-{rec['id']}"
    if setting.startswith("/"):
        return cgroups.check_parent(setting)
    return None


async def create(ctx: Context, container_id: str, rootfs: str, image: dict | None, image_ref: str) -> dict[str, Any]:
    """Build the OCI spec and have conmon create the container with runc.

    `image`: imaged's image record ({"id", "repo_tags", "repo_digests", "config": {...}}).
    """
    records = ctx.records
    rec = records.container(container_id)
    async with records.lock(rec["id"]):
        if rec["state"] in CONTAINER_STATES:
            return {"id": rec["id"]}
        if rec["state"] != "reserved":
            raise FailedPrecondition(f"container {container_id} is {rec['state']}")
        sb = records.sandbox(rec["sandbox_id"], visible=True)
        if sb["state"] != "ready":
            raise FailedPrecondition(f"pod sandbox {sb['id']} is not ready")
        cfg = rec["config"]
        image = image or {}
        image_cfg = image.get("config") or {}
        linux = cfg.get("linux") or {}
        sc = linux.get("security_context") or {}
        target_ns = _target_pid_ns(ctx, sb, sc.get("namespace_options") or {})
        log_path = _log_path(ctx, sb, cfg)
        handler = ctx.handler(rec["runtime_handler"])
        rro, rro_reason = ctx.rro(rec["runtime_handler"])
        built = await asyncio.to_thread(
            spec.build, container_id=rec["id"], config=cfg, image=image_cfg, rootfs=rootfs,
            sandbox=infra.facts(sb), rc=ctx.rc, systemd_cgroup=ctx.systemd, target_pid_ns=target_ns,
            pids_limit=ctx.rc.pids_limit,
            privileged_host_devices=not handler.privileged_without_host_devices,
            hugetlb=ctx.features.hugetlb, rro=rro, rro_reason=rro_reason)
        bundle = ctx.bundle(rec["id"])
        if os.path.exists(bundle):
            # An earlier attempt was cut off (its conmon may even have gone
            # on): clear what it left, runc container and exit file included.
            log.warning("container_create_clears_leftover", container_id=rec["id"])
            await undo(ctx, {**rec, "bundle": bundle})
        os.makedirs(bundle, mode=0o700, exist_ok=True)
        image_spec = cfg.get("image") or {}
        rec.update(
            state="creating", bundle=bundle, rootfs=rootfs, log_path=log_path,
            stop_signal=_signal_name(built.stop_signal), privileged=built.privileged,
            image_name=image_spec.get("image") or image_ref or image.get("id", ""),
            image_id=image.get("id", ""),
            image_ref=image_ref or ((image.get("repo_digests") or [None])[0]) or image.get("id", ""),
            mounts=built.mounts, resources=(linux.get("resources") or {}),
            uid=built.user.uid, gid=built.user.gid, supplemental_groups=list(built.user.additional_gids),
            tty=bool(cfg.get("tty")),
            conmon_cgroup_dirs=[],
        )
        built.spec["annotations"].update(oci_annotations.of_container(rec, sb))
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(built.spec, f)
        conmon_cgroup = _conmon_cgroup_path(ctx, rec, sb)
        if conmon_cgroup and ctx.rc.conmon_cgroup == "pod":
            rec["conmon_cgroup_dirs"] = cgroups.missing(conmon_cgroup)
        # Written before conmon runs, so that a runtimed killed meanwhile finds what to undo; put on disk
        # while conmon works, for a machine that goes down, and before the call answers.
        await records.save_container(rec, durable=False)
        synced = asyncio.create_task(records.sync(CONTAINERS, rec["id"]))
        try:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            procs = []
            if conmon_cgroup:
                cgroups.create(conmon_cgroup)
                procs = cgroups.procs(conmon_cgroup)
            conmon_spec = conmon.ConmonSpec(
                container_id=rec["id"], name=rec["name"], bundle=bundle, log_path=log_path,
                exit_dir=ctx.exit_dir, socket_dir=ctx.attach_dir,
                persist_dir=os.path.join(bundle, "persist"), runc=ctx.runc(rec),
                monitor_path=handler.monitor_path, terminal=bool(cfg.get("tty")),
                stdin=bool(cfg.get("stdin")), stdin_once=bool(cfg.get("stdin_once")),
                log_size_max=ctx.rc.log_size_max, log_level=ctx.rc.log_level,
                systemd_cgroup=ctx.systemd)
            started = await conmon.start(conmon_spec, cgroup_procs=procs, timeout=handler.container_create_timeout)
            faults.point("runtimed.create_container.after_conmon")
        except BaseException:
            await asyncio.gather(synced, return_exceptions=True)
            await undo(ctx, rec)
            await records.back_to_reserved(CONTAINERS, rec)
            raise
        rec.update(state="created", pid=started.container_pid,
                   pid_start=process.process_start_time(started.container_pid),
                   conmon_pid=started.conmon_pid, conmon_start=process.process_start_time(started.conmon_pid),
                   created_at=time.time_ns())
        # Told as the record changes (see exits.mark_exited), before an await lets an exit in.
        ctx.events.emit("container", "created", rec["id"], rec["sandbox_id"])
        await records.save_container(rec, durable=False)
        await synced
    await records.notify()
    log.info("container_created", container_id=rec["id"], name=rec["name"])
    return {"id": rec["id"]}


async def release(ctx: Context, container_id: str) -> dict[str, Any]:
    """Undo a reservation whose CreateContainer failed; a created container is left alone."""
    await ctx.records.release(CONTAINERS, container_id, lambda rec: undo(ctx, rec))
    return {}


async def undo(ctx: Context, rec: dict[str, Any]) -> None:
    """Remove what a creation made: the runc container, conmon, and the container's files."""
    try:
        await ctx.runc(rec).delete(rec["id"], force=True)
    except Exception as e:
        log.warning("container_undo_delete_failed", container_id=rec["id"], error=str(e))
    pid = rec.get("conmon_pid") or conmon.read_pidfile(os.path.join(rec.get("bundle", "/nonexistent"), "conmon.pid"))
    await conmon.wait_gone(pid, rec.get("conmon_start"))
    await container_remove.remove_files(ctx, rec)
