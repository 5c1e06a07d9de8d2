"""Pods' and containers' CRI statuses and lists, built in one place.

The status calls, the list calls and the events (event_publisher.py) all use
these builders, so that what an event says of a pod or container is exactly
what a status call would have answered at that moment.
"""

from __future__ import annotations

import json
import os
from typing import Any

from services.runtimed import exits, infra
from services.runtimed.context import Context
from services.runtimed.records import CONTAINER_STATES, SANDBOX_STATES
from shared.errors import NotFound

_SANDBOX_STATE_FILTER = ["SANDBOX_READY", "SANDBOX_NOTREADY"]
_CONTAINER_STATE_FILTER = ["CONTAINER_CREATED", "CONTAINER_RUNNING", "CONTAINER_EXITED", "CONTAINER_UNKNOWN"]


# -- pods ---------------------------------------------------------------------------


def sandbox_state(rec: dict[str, Any]) -> str:
    """Its CRI state; a dead infra process counts once noticed (infra.check: status calls, the exit watcher)."""
    if rec["state"] == "ready" and rec.get("infra_exited"):
        return "SANDBOX_NOTREADY"
    return SANDBOX_STATES[rec["state"]]


def sandbox_entry(rec: dict[str, Any]) -> dict[str, Any]:
    """A pod as ListPodSandbox shows it."""
    cfg = rec["config"]
    return {
        "id": rec["id"],
        "metadata": cfg.get("metadata") or {},
        "state": sandbox_state(rec),
        "created_at": rec.get("created_at", 0),
        "labels": cfg.get("labels") or {},
        "annotations": cfg.get("annotations") or {},
        "runtime_handler": rec.get("runtime_handler", ""),
    }


def sandbox_status(rec: dict[str, Any]) -> dict[str, Any]:
    """A pod's PodSandboxStatus (netd's addresses are the ones given at creation)."""
    ns = ((rec["config"].get("linux") or {}).get("security_context") or {}).get("namespace_options") or {}
    status = sandbox_entry(rec)
    ips = rec.get("ips") or []
    status["network"] = {"ip": ips[0] if ips else "",
                         "additional_ips": [{"ip": ip} for ip in ips[1:]]}
    status["linux"] = {"namespaces": {"options": {
        "network": rec.get("network_mode", "POD"), "pid": rec.get("pid_mode", "POD"),
        "ipc": rec.get("ipc_mode", "POD"), **({"target_id": ns["target_id"]} if ns.get("target_id") else {})}}}
    return status


def _sandbox_info(rec: dict[str, Any]) -> dict[str, Any]:
    infra_rec = rec.get("infra") or {}
    return {"info": json.dumps({
        "hostname": rec.get("hostname"), "netns_path": rec.get("netns_path"),
        "cgroup_parent": rec.get("cgroup_parent"), "log_directory": rec.get("log_directory"),
        "infra_pid": infra_rec.get("pid"), "runtime_handler": rec.get("runtime_handler"),
        "sysctls": rec.get("sysctls"), "config": rec["config"],
    })}


async def sandbox_status_call(ctx: Context, sandbox_id: str, verbose: bool) -> dict[str, Any]:
    rec = ctx.records.sandbox(sandbox_id, visible=True)
    infra.check(ctx, rec)
    result: dict[str, Any] = {"status": sandbox_status(rec)}
    if verbose:
        result["info"] = _sandbox_info(rec)
    return result


async def list_sandboxes(ctx: Context, filter: dict | None) -> list[dict[str, Any]]:
    f = filter or {}
    want_state = _wanted_state(f, _SANDBOX_STATE_FILTER)
    selector = f.get("label_selector") or {}
    out = []
    for rec in list(ctx.records.sandboxes.values()):
        if rec["state"] not in SANDBOX_STATES:
            continue
        if f.get("id") and not rec["id"].startswith(f["id"]):
            continue
        infra.check(ctx, rec)
        entry = sandbox_entry(rec)
        if _selected(entry, want_state, selector):
            out.append(entry)
    return out


# -- containers -----------------------------------------------------------------------


def container_entry(rec: dict[str, Any]) -> dict[str, Any]:
    """A container as ListContainers shows it."""
    cfg = rec["config"]
    return {
        "id": rec["id"],
        "pod_sandbox_id": rec["sandbox_id"],
        "metadata": cfg.get("metadata") or {},
        "image": {"image": rec.get("image_name", "")},
        "image_ref": rec.get("image_ref", ""),
        "image_id": rec.get("image_id", ""),
        "state": CONTAINER_STATES[rec["state"]],
        "created_at": rec.get("created_at", 0),
        "labels": cfg.get("labels") or {},
        "annotations": cfg.get("annotations") or {},
    }


def container_status(rec: dict[str, Any]) -> dict[str, Any]:
    """A container's ContainerStatus, as its record says (exits are read by the caller)."""
    status = container_entry(rec)
    del status["pod_sandbox_id"]
    status.update(
        started_at=rec.get("started_at", 0) or 0,
        finished_at=rec.get("finished_at", 0) or 0,
        exit_code=rec.get("exit_code", 0) or 0,
        reason=rec.get("reason", ""),
        message=rec.get("message", ""),
        mounts=rec.get("mounts") or [],
        log_path=rec.get("log_path", ""),
        resources={"linux": rec.get("resources") or {}},
    )
    if rec.get("uid") is not None:
        # The identity the container's process really has (CRI-O reports the spec's process user).
        linux_user = {"uid": rec["uid"]}
        if rec.get("gid") is not None:
            linux_user.update(gid=rec["gid"], supplemental_groups=rec.get("supplemental_groups") or [])
        status["user"] = {"linux": linux_user}
    return status


def _container_info(rec: dict[str, Any]) -> dict[str, Any]:
    try:
        with open(os.path.join(rec["bundle"], "config.json")) as f:
            runtime_spec = json.load(f)
    except (OSError, ValueError):
        runtime_spec = None
    return {"info": json.dumps({
        "sandboxID": rec["sandbox_id"], "pid": rec.get("pid", 0), "runtimeSpec": runtime_spec,
        "conmonPid": rec.get("conmon_pid"), "bundle": rec.get("bundle"), "privileged": rec.get("privileged"),
    })}


async def container_status_call(ctx: Context, container_id: str, verbose: bool) -> dict[str, Any]:
    rec = ctx.records.container(container_id, visible=True)
    await exits.refresh(ctx, rec)
    if rec["state"] not in CONTAINER_STATES:
        raise NotFound(f"container {container_id} not found")
    result: dict[str, Any] = {"status": container_status(rec)}
    if verbose:
        result["info"] = _container_info(rec)
    return result


async def list_containers(ctx: Context, filter: dict | None) -> list[dict[str, Any]]:
    f = filter or {}
    want_state = _wanted_state(f, _CONTAINER_STATE_FILTER)
    selector = f.get("label_selector") or {}
    out = []
    for rec in list(ctx.records.containers.values()):
        if rec["state"] not in CONTAINER_STATES:
            continue
        if f.get("id") and not rec["id"].startswith(f["id"]):
            continue
        if f.get("pod_sandbox_id") and not rec["sandbox_id"].startswith(f["pod_sandbox_id"]):
            continue
        await exits.refresh(ctx, rec)
        if rec["state"] not in CONTAINER_STATES:
            continue  # removed while its exit was being read
        entry = container_entry(rec)
        if _selected(entry, want_state, selector):
            out.append(entry)
    return out


# -- filters --------------------------------------------------------------------------


def _wanted_state(f: dict[str, Any], names: list[str]) -> str | None:
    """The state a CRI filter asks for: {"state": NAME} or its enum number, as MessageToDict gives it."""
    want_state = f.get("state")
    if isinstance(want_state, dict):
        want_state = want_state.get("state")
    if isinstance(want_state, int):
        want_state = names[want_state]
    return want_state


def _selected(entry: dict[str, Any], want_state: str | None, selector: dict[str, str]) -> bool:
    """Whether a listed sandbox or container passes a CRI filter's state and label selector."""
    return (not want_state or entry["state"] == want_state) and \
        all(entry["labels"].get(k) == v for k, v in selector.items())
