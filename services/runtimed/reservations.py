"""Name reservations (CRI-O's resource store): a pod's or container's name is held while it is made.

The frontend reserves the name first, then runs the steps of other daemons
(network, root file system), then has runtimed make the object. A retried
request with the same name and configuration waits for the first one and gets
the same id; the same request retried after its reply was lost (same token)
gets its own reservation back; a reservation nobody finished within the lease
may be taken over.

A reservation is held by the frontend process that made it (`holder`, a name
each frontend picks at start). Only one frontend runs at a time, so a
reservation of another holder was left by a frontend that died mid-call: a
retry from the new one takes it over at once and redoes the steps (each is
idempotent), and what no retry takes over, the new frontend undoes
(`take_over_abandoned`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any, Callable

import structlog

from services.runtimed import spec, users
from services.runtimed.context import Context
from services.runtimed.records import CONTAINER_STATES, CONTAINERS, SANDBOX_STATES, SANDBOXES
from shared.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument

log = structlog.get_logger(__name__)

# A reservation nobody finished within this time may be taken over by a retry.
RESERVATION_LEASE = 240.0
# The token of a reservation a new frontend took over to undo it (see take_over_abandoned).
_UNDO_TOKEN = "undo-abandoned"


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _metadata(config: dict[str, Any], what: str, fields: tuple[str, ...]) -> dict[str, Any]:
    meta = config.get("metadata") or {}
    for name in fields:
        value = meta.get(name)
        if not value or not isinstance(value, str):
            raise InvalidArgument(f"{what} metadata.{name} is required")
    return meta


async def reserve_sandbox(ctx: Context, config: dict, runtime_handler: str, timeout: float,
                          token: str, holder: str) -> dict[str, Any]:
    """Hold the pod's name; a retry of a pod still being made waits for it and gets its id."""
    meta = _metadata(config, "pod sandbox", ("name", "namespace", "uid"))
    ctx.handler(runtime_handler)
    users.check_run_as_group(((config.get("linux") or {}).get("security_context") or {}), pod=True)
    attempt = int(meta.get("attempt") or 0)
    name = f"k8s_{meta['name']}_{meta['namespace']}_{meta['uid']}_{attempt}"
    config_hash = _hash([config, runtime_handler])

    def make() -> dict[str, Any]:
        return {"id": secrets.token_hex(32), "name": name, "config": config, "config_hash": config_hash,
                "runtime_handler": runtime_handler or ctx.rc.default_runtime, "state": "reserved",
                "reserved_at": time.time(), "created_at": 0}

    return await _reserve(ctx, SANDBOXES, name, config_hash, timeout, make, token, holder)


async def reserve_container(ctx: Context, sandbox_id: str, config: dict, timeout: float,
                            token: str, holder: str) -> dict[str, Any]:
    """Hold the container's name in its pod; a retry of a create in progress waits for it."""
    sb = ctx.records.sandbox(sandbox_id, visible=True)
    if sb["state"] != "ready":
        raise FailedPrecondition(f"pod sandbox {sandbox_id} is not ready")
    meta = _metadata(config, "container", ("name",))
    rro, rro_reason = ctx.rro(sb.get("runtime_handler", ""))
    spec.check_request(config, rro=rro, rro_reason=rro_reason)
    pod_meta = sb["config"].get("metadata") or {}
    attempt = int(meta.get("attempt") or 0)
    name = (f"k8s_{meta['name']}_{pod_meta.get('name')}_{pod_meta.get('namespace')}_"
            f"{pod_meta.get('uid')}_{attempt}")
    config_hash = _hash([sb["id"], config])

    def make() -> dict[str, Any]:
        return {"id": secrets.token_hex(32), "name": name, "sandbox_id": sb["id"], "config": config,
                "config_hash": config_hash, "runtime_handler": sb.get("runtime_handler", ""),
                "state": "reserved", "reserved_at": time.time(), "created_at": 0}

    return await _reserve(ctx, CONTAINERS, name, config_hash, timeout, make, token, holder)


async def _reserve(ctx: Context, kind: str, name: str, config_hash: str, timeout: float,
                   make: Callable[[], dict[str, Any]], token: str, holder: str) -> dict[str, Any]:
    """The name's record, made if new. `token` names the calling request: the same request
    retried (its reply was lost while runtimed restarted) gets its own reservation back;
    `holder` names the calling frontend."""
    records = ctx.records
    what = "sandbox" if kind == SANDBOXES else "container"
    names = records.names[kind]
    table = records.table(kind)
    done_states = SANDBOX_STATES if kind == SANDBOXES else CONTAINER_STATES
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        existing_id = names.get(name)
        rec = table.get(existing_id) if existing_id else None
        if rec is None:
            rec = make()
            rec.update(token=token, holder=holder)
            names[name] = rec["id"]
            table[rec["id"]] = rec
            await records.save(kind, rec)
            log.info(f"{what}_reserved", id=rec["id"], name=name)
            return {"id": rec["id"], "state": "reserved", "created": True}
        if rec.get("config_hash") != config_hash:
            raise AlreadyExists(f"the name {name} is already used by {what} {rec['id']}")
        if rec["state"] in done_states:
            if (kind == SANDBOXES and rec["state"] != "ready") or rec["state"] == "exited":
                raise AlreadyExists(f"the name {name} is held by finished {what} {rec['id']}")
            return {"id": rec["id"], "state": rec["state"], "created": False}
        if token and rec.get("token") == token:
            return {"id": rec["id"], "state": "reserved", "created": True}
        # Reserved by a frontend that is gone (its steps will never go on), or by an
        # earlier call nobody finished within the lease: this call takes it over. One
        # being created is runtimed's own work, which ends soon either way: wait for it.
        abandoned = rec["state"] == "reserved" and rec.get("holder") != holder
        if abandoned or time.time() - rec.get("reserved_at", 0) > RESERVATION_LEASE:
            rec.update(reserved_at=time.time(), token=token, holder=holder)
            await records.save(kind, rec)
            log.info(f"{what}_reservation_taken_over", id=rec["id"], name=name,
                     reason="frontend gone" if abandoned else "lease over")
            return {"id": rec["id"], "state": "reserved", "created": True}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(
                f"the {what} {name} is still being created by an earlier request ({rec['id']})")
        await records.wait_change(min(remaining, 1.0))


async def take_over_abandoned(ctx: Context, holder: str) -> dict[str, Any]:
    """Hand the reservations of frontends that are gone to `holder`, which undoes their steps.

    {"sandboxes": [...], "containers": [...]}: the ids held for the undo (those taken over
    by an earlier call of the same holder too, so a retried call loses none); "creating":
    how many of theirs runtimed is still making (they end made, or reserved again: ask again).
    """
    records = ctx.records
    found: dict[str, Any] = {"sandboxes": [], "containers": [], "creating": 0}
    for kind, key in ((SANDBOXES, "sandboxes"), (CONTAINERS, "containers")):
        for rec in list(records.table(kind).values()):
            if rec["state"] == "creating" and rec.get("holder") != holder:
                found["creating"] += 1
                continue
            if rec["state"] != "reserved":
                continue
            if rec.get("holder") != holder:
                rec.update(holder=holder, token=_UNDO_TOKEN)
                await records.save(kind, rec)
                log.info("reservation_of_gone_frontend", kind=kind, id=rec["id"], name=rec["name"])
            if rec.get("token") == _UNDO_TOKEN:
                found[key].append(rec["id"])
    return found
