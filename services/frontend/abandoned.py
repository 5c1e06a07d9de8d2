"""At start: undo what a frontend that died left half made or half removed.

A frontend killed in the middle of RunPodSandbox or CreateContainer leaves the
name reserved in runtimed, and maybe a pod network (netd) or a root file
system (storaged) made for it. The kubelet's retry takes such a reservation
over and goes on from there (runtimed's reservations.py); the rest, which no
retry claimed first, is undone here, as the story's own undo steps would have
done.

One killed in the middle of RemovePodSandbox may have had runtimed forget a
container whose root file system storaged still keeps: the retry no longer
knows it. So a root file system, or a pod network, that belongs to no pod or
container runtimed knows is removed too. Each daemon is listed before
runtimed: what a call in flight makes now is reserved in runtimed first.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from services.frontend.daemons import Daemons
from services.frontend.runtime_convert import DETACHED_GRACE, UNDO_TIMEOUT
from shared.errors import CriopyError

log = structlog.get_logger(__name__)

# How long to wait before asking again, after a failure or while runtimed still makes
# pods or containers for a gone frontend (they end made, or reserved again).
POLL = 1.0


async def recover(daemons: Daemons) -> None:
    """Undo, in the background, what a gone frontend left; keeps trying for a while when daemons are down."""
    give_up = time.monotonic() + DETACHED_GRACE + UNDO_TIMEOUT
    swept = False
    while True:
        if not swept:
            swept = await _remove_orphans(daemons)
        undone = await _undo_abandoned(daemons)
        if (swept and undone) or time.monotonic() > give_up:
            return
        await asyncio.sleep(POLL)


async def _undo_abandoned(daemons: Daemons) -> bool:
    """Take over and undo the reservations of gone frontends; False: ask again later."""
    try:
        found = await _call(daemons, "runtimed", "take_over_reservations", holder=daemons.instance)
    except CriopyError as e:
        log.warning("abandoned_reservations_unknown", error=e.message)
        return False
    done = not found["creating"]
    for container_id in found["containers"]:
        done &= (await _undo(daemons, "storaged", "remove_rootfs", container_id=container_id)
                 and await _undo(daemons, "runtimed", "release_container", container_id=container_id))
    for pod_id in found["sandboxes"]:
        done &= (await _undo(daemons, "netd", "detach", pod_id=pod_id)
                 and await _undo(daemons, "runtimed", "release_sandbox", sandbox_id=pod_id))
    if found["sandboxes"] or found["containers"]:
        log.info("abandoned_reservations_undone", sandboxes=found["sandboxes"], containers=found["containers"])
    return done


async def _remove_orphans(daemons: Daemons) -> bool:
    """Remove root file systems and pod networks of containers and pods runtimed does not know."""
    try:
        rootfs = await _call(daemons, "storaged", "list_rootfs")
        networks = await _call(daemons, "netd", "list_pod_networks")
        known = await _call(daemons, "runtimed", "record_ids")
    except CriopyError as e:
        log.warning("orphans_unknown", error=e.message)
        return False
    done = True
    for container_id in {r["container_id"] for r in rootfs} - set(known["containers"]):
        log.info("orphan_rootfs_removed", container_id=container_id)
        done &= await _undo(daemons, "storaged", "remove_rootfs", container_id=container_id)
    for pod_id in {n["pod_id"] for n in networks} - set(known["sandboxes"]):
        log.info("orphan_pod_network_detached", pod_id=pod_id)
        done &= await _undo(daemons, "netd", "detach", pod_id=pod_id)
    return done


async def _call(daemons: Daemons, daemon: str, method: str, **params: Any) -> Any:
    return await daemons.call(daemon, method, deadline=time.time() + UNDO_TIMEOUT, **params)


async def _undo(daemons: Daemons, daemon: str, method: str, **params: Any) -> bool:
    try:
        await _call(daemons, daemon, method, **params)
        return True
    except CriopyError as e:
        # What was taken over stays this frontend's: runtimed hands it back on the next ask.
        log.warning("abandoned_undo_failed", daemon=daemon, method=method, error=e.message, **params)
        return False
