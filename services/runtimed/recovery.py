"""At start: pods and containers whose record was lost are found again and given a minimal record.

A record found torn or garbage (store.py moved it to quarantine) leaves what
it described on the machine: runc's containers (`runc list` gives their
status, pid, bundle and the annotations of oci_annotations.py), the bundles
under <state>/containers/, each pod's directories under <state>/sandboxes/
and <run>/sandboxes/ (its IPC and UTS namespace pins, its /dev/shm). Each is
found again from those, as CRI-O restores its pods and containers from their
config.json annotations:

- A lost pod comes back NOTREADY, with the name, metadata and cgroup parent
  its containers' (or infra process's) annotations give. The kubelet stops
  and removes a NOTREADY pod (and makes a new one if the pod still exists);
  that RemovePodSandbox also releases what the other daemons hold for the pod,
  its network in netd and its containers' root file systems in storaged, as
  for any pod. Removing it here at start instead would leave those to nobody:
  daemons never call each other, and the kubelet does not remove a pod it
  never sees.
- A lost container comes back in the state runc shows (a running one is left
  running: its workload is not touched), with the metadata, labels, image and
  log path of its annotations; one runc no longer knows comes back exited.
  It is then listed, stopped and removed (its root file system with it) as
  any container is.

What no annotation says (a pod's own labels, DNS settings, log directory, a
container's mounts and limits) stays empty; a rebuilt record says
`recovered: true`. A pod whose cgroup parent is known gets its leaf cgroup
removed with it when empty, since whether runtimed made it was in the record.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from datetime import datetime
from typing import Any, Iterator

import structlog

from services.runtimed import cgroups, conmon, oci_annotations as ann, process
from services.runtimed.context import Context
from services.runtimed.records import CONTAINERS, SANDBOXES
from shared.errors import CriopyError

log = structlog.get_logger(__name__)

_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


async def recover(ctx: Context) -> None:
    """Give a record to every pod and container the machine shows and no record knows."""
    known = ctx.records
    in_runc = await _runc_containers(ctx)
    bundles = _listdir(os.path.join(ctx.state_dir, "containers"))
    for container_id in sorted(
            {i for i, (_, entry) in in_runc.items() if _type(entry) == ann.TYPE_CONTAINER} | set(bundles)):
        if container_id in known.containers:
            continue
        with _each("container", container_id):
            handler, entry = in_runc.get(container_id, ("", None))
            spec = _spec(ctx.bundle(container_id))
            annotations = (entry or {}).get("annotations") or (spec or {}).get("annotations") or {}
            if annotations.get(ann.CONTAINER_TYPE) != ann.TYPE_CONTAINER:
                continue  # nothing says it is a container of a pod: reconcile deletes it from runc
            rec = _container(ctx, container_id, handler, entry, spec or {}, annotations)
            known.add(CONTAINERS, rec)
            await known.save_container(rec)
            log.warning("container_record_rebuilt", container_id=container_id, sandbox_id=rec["sandbox_id"],
                        state=rec["state"], name=rec["name"])

    pod_ids = (set(_listdir(os.path.join(ctx.state_dir, "sandboxes")))
               | set(_listdir(os.path.join(ctx.run_dir, "sandboxes")))
               | {i for i, (_, entry) in in_runc.items() if _type(entry) == ann.TYPE_SANDBOX}
               | {c["sandbox_id"] for c in known.containers.values() if c["sandbox_id"]})
    for sandbox_id in sorted(pod_ids - set(known.sandboxes)):
        with _each("sandbox", sandbox_id):
            handler, entry = in_runc.get(sandbox_id, ("", None))
            rec = _sandbox(ctx, sandbox_id, handler, entry, _pod_annotations(ctx, sandbox_id, entry))
            known.add(SANDBOXES, rec)
            await known.save_sandbox(rec)
            log.warning("sandbox_record_rebuilt", sandbox_id=sandbox_id, name=rec["name"],
                        containers=len(known.containers_of(sandbox_id)))


@contextlib.contextmanager
def _each(kind: str, object_id: str) -> Iterator[None]:
    """Rebuild one record; a failure is logged, and start-up goes on without it."""
    try:
        yield
    except Exception as e:
        log.exception(f"{kind}_record_rebuild_failed", id=object_id, error=str(e))


async def _runc_containers(ctx: Context) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every container of every runtime handler's runc root: id -> (handler, `runc list` entry)."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    roots: set[str] = set()
    for handler in sorted(ctx.rc.runtimes):
        try:
            runc = ctx.runc_for(handler)
        except CriopyError:
            continue
        if runc.root in roots or not os.path.isdir(runc.root):
            continue
        roots.add(runc.root)
        try:
            entries = await runc.list()
        except (CriopyError, ValueError) as e:
            log.error("recovery_runc_list_failed", root=runc.root, error=str(e))
            continue
        for entry in entries or []:
            if isinstance(entry, dict) and entry.get("id"):
                found.setdefault(entry["id"], ("" if handler == ctx.rc.default_runtime else handler, entry))
    return found


def _container(ctx: Context, container_id: str, handler: str, entry: dict[str, Any] | None,
               spec: dict[str, Any], annotations: dict[str, str]) -> dict[str, Any]:
    bundle = ctx.bundle(container_id)
    config = ann.config_of(annotations)
    config["image"] = {"image": annotations.get(ann.IMAGE_NAME, "")}
    status = (entry or {}).get("status")
    pid = int((entry or {}).get("pid") or 0)
    conmon_pid = conmon.read_pidfile(os.path.join(bundle, "conmon.pid"))
    created = _created_ns(entry, os.path.join(bundle, "config.json"))
    rec: dict[str, Any] = {
        "id": container_id, "name": annotations.get(ann.NAME, ""),
        "sandbox_id": annotations.get(ann.SANDBOX_ID, ""), "config": config, "config_hash": "",
        "runtime_handler": handler, "bundle": bundle, "rootfs": (spec.get("root") or {}).get("path", ""),
        "log_path": annotations.get(ann.LOG_PATH, ""), "image_name": annotations.get(ann.IMAGE_NAME, ""),
        "image_id": annotations.get(ann.IMAGE, ""), "image_ref": annotations.get(ann.IMAGE_REF, ""),
        "stop_signal": "TERM", "tty": bool((spec.get("process") or {}).get("terminal")), "mounts": [],
        "resources": {}, "pid": pid, "pid_start": process.process_start_time(pid) if pid else None,
        "conmon_pid": conmon_pid, "conmon_start": process.process_start_time(conmon_pid or 0),
        "created_at": created, "started_at": created if status in ("running", "paused") else 0,
        "conmon_cgroup_dirs": _conmon_cgroup_dirs(ctx, container_id, annotations), "recovered": True,
    }
    if status in ("created", "running", "paused"):
        rec["state"] = "running" if status != "created" else "created"
    else:
        code = conmon.read_exit_file(os.path.join(ctx.exit_dir, container_id))
        rec.update(state="exited", exit_code=255 if code is None else code, finished_at=time.time_ns(),
                   reason="Error" if code is None else ("Completed" if code == 0 else "Error"),
                   message="" if code is not None else "its record was lost and it no longer runs")
    return rec


def _sandbox(ctx: Context, sandbox_id: str, handler: str, entry: dict[str, Any] | None,
             annotations: dict[str, str]) -> dict[str, Any]:
    pod_dir, run_dir = ctx.sandbox_paths(sandbox_id)
    name = annotations.get(ann.SANDBOX_NAME, "")
    config = ann.config_of(annotations) if annotations.get(ann.NAME) == name and entry else \
        {"metadata": _metadata_of(name), "labels": {}, "annotations": {}}
    parent = annotations.get(ann.CGROUP_PARENT, "")

    def present(path: str) -> str | None:
        return path if os.path.lexists(path) else None

    rec: dict[str, Any] = {
        "id": sandbox_id, "name": name, "config": config, "config_hash": "", "runtime_handler": handler,
        "state": "notready", "created_at": _created_ns(None, pod_dir, run_dir), "dir": pod_dir, "run_dir": run_dir,
        "ipc_ns_path": present(os.path.join(run_dir, "ipcns")), "uts_ns_path": present(os.path.join(run_dir, "utsns")),
        "shm_path": present(os.path.join(run_dir, "shm")), "netns_path": None, "ips": [],
        "cgroup_parent": parent, "recovered": True,
        # The pod's own leaf only, and only when empty (remove_dirs leaves one with children).
        "cgroups_made": [d for d in cgroups.controller_dirs(parent) if os.path.isdir(d)]
        if parent and not ctx.systemd else [],
        "infra": None,
    }
    if entry is not None:
        pid = int(entry.get("pid") or 0)
        bundle = os.path.join(pod_dir, "infra")
        conmon_pid = conmon.read_pidfile(os.path.join(bundle, "conmon.pid"))
        rec["infra"] = {"bundle": bundle, "pid": pid, "pid_start": process.process_start_time(pid) if pid else None,
                        "conmon_pid": conmon_pid, "conmon_start": process.process_start_time(conmon_pid or 0)}
    return rec


def _pod_annotations(ctx: Context, sandbox_id: str, infra_entry: dict[str, Any] | None) -> dict[str, str]:
    """What the pod's infra process or else one of its containers' bundles says of the pod."""
    if infra_entry and infra_entry.get("annotations"):
        return infra_entry["annotations"]
    for rec in ctx.records.containers_of(sandbox_id):
        spec = _spec(rec.get("bundle") or ctx.bundle(rec["id"]))
        annotations = (spec or {}).get("annotations") or {}
        if annotations.get(ann.SANDBOX_NAME):
            return {ann.SANDBOX_NAME: annotations[ann.SANDBOX_NAME],
                    ann.CGROUP_PARENT: annotations.get(ann.CGROUP_PARENT, "")}
    return {}


def _metadata_of(name: str) -> dict[str, Any]:
    """A pod's metadata from its record name, k8s_<name>_<namespace>_<uid>_<attempt> (names have no `_`)."""
    parts = name.split("_")
    if len(parts) != 5 or parts[0] != "k8s" or not parts[4].isdigit():
        return {}
    return {"name": parts[1], "namespace": parts[2], "uid": parts[3], "attempt": int(parts[4])}


def _conmon_cgroup_dirs(ctx: Context, container_id: str, annotations: dict[str, str]) -> list[str]:
    """The cgroup conmon was put in (container_create.py), where it still exists."""
    parent = annotations.get(ann.CGROUP_PARENT, "")
    if ctx.systemd or ctx.rc.conmon_cgroup != "pod" or not parent:
        return []
    return [d for d in cgroups.controller_dirs(f"{parent.rstrip('/')}/crio-conmon-{container_id}") if os.path.isdir(d)]


def _spec(bundle: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def _type(entry: dict[str, Any]) -> str:
    return (entry.get("annotations") or {}).get(ann.CONTAINER_TYPE, "")


def _created_ns(entry: dict[str, Any] | None, *paths: str) -> int:
    """When runc says the container was made, else the oldest of `paths`, else now."""
    found = _RFC3339.fullmatch(str((entry or {}).get("created") or ""))
    if found:
        whole, fraction, zone = found.groups()  # runc writes nanoseconds, more than datetime holds
        stamp = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
        return int(stamp.timestamp()) * 1_000_000_000 + int((fraction or "0")[:9].ljust(9, "0"))
    times = []
    for path in paths:
        try:
            times.append(os.stat(path).st_mtime_ns)
        except OSError:
            continue
    return min(times) if times else time.time_ns()


def _listdir(path: str) -> list[str]:
    try:
        return [name for name in os.listdir(path) if not name.startswith(".")]
    except FileNotFoundError:
        return []
