"""An image's layers in storaged: unpacked under a lease, the lease ended, unused layers collected.

storaged deletes the layers that no image (imaged's top layers) and no root
file system needs. Two races would lose layers a story is about to use:

- PullImage unpacks, then records the top layer in imaged: in between, only
  storaged's lease on the unpacked stack keeps it. The story ends the lease
  once imaged lists the image (the lease also runs out by itself, so a
  frontend that dies mid-pull does not keep layers forever).
- A collection reads imaged's top layers, then asks storaged: a list read
  before a pull recorded its top layer must not reach storaged after that
  pull ended its lease. The frontend is the only caller of both, so ending a
  lease and a collection never interleave here (`_COLLECTING`).

CreateContainer uses the same lease when storaged lost an image's layers (a
record torn by a power cut): they are unpacked again from imaged's blobs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import structlog

from services.frontend.runtime_convert import UNDO_TIMEOUT, Story
from shared.errors import NotFound

log = structlog.get_logger(__name__)

_COLLECTING = asyncio.Lock()


async def unpack(story: Story, layers: list[dict[str, Any]], lease: str) -> dict[str, Any]:
    """storaged unpacks the layers (those it lacks) and keeps the stack until `release(lease)`."""
    # The lease outlives the story's own deadline by the time its undo steps get.
    seconds = max(1.0, story.deadline - time.time()) + UNDO_TIMEOUT
    return await story.step("storaged", "unpack", layers=layers, lease=lease, lease_seconds=seconds)


async def release(story: Story, lease: str) -> None:
    """End a lease: its layers are kept from now on by what records them (imaged, a root file system)."""
    async with _COLLECTING:
        await story.undo("storaged", "release_layers", lease=lease)


async def collect(call: Callable[..., Awaitable[Any]], only: list[str] | None = None) -> dict[str, Any] | None:
    """Delete the layers (of `only`, when given) that no image and no root file system needs.

    `call` makes the bus calls: a CRI call's (failures raised) or an undo's (None on failure).
    """
    async with _COLLECTING:
        keep = await call("imaged", "top_layers")
        if keep is None:
            return None
        params = {} if only is None else {"only": only}
        return await call("storaged", "gc_layers", keep_top_layers=keep, **params)


async def create_rootfs(story: Story, container_id: str, image: dict[str, Any]) -> dict[str, Any]:
    """The container's root file system on the image's layers; layers storaged lost are unpacked again first."""
    try:
        return await story.step("storaged", "create_rootfs", container_id=container_id,
                                top_layer=image.get("top_layer"))
    except NotFound as e:
        log.warning("image_layers_missing", image_id=image["id"], error=e.message)
    # NotFound here too when imaged lacks blobs of the image: it is no longer listed, and the kubelet pulls it again.
    blobs = await story.step("imaged", "layer_blobs", image_id=image["id"])
    lease = f"create {story.call.request_id}"
    try:
        unpacked = await unpack(story, blobs["layers"], lease)
        if unpacked.get("top_layer") != blobs.get("top_layer"):
            await story.step("imaged", "set_top_layer", image_id=image["id"], top_layer=unpacked.get("top_layer"),
                             unpacked_size=unpacked["unpacked_size"])
        log.info("image_layers_unpacked_again", image_id=image["id"], layers=len(blobs["layers"]))
        return await story.step("storaged", "create_rootfs", container_id=container_id,
                                top_layer=unpacked.get("top_layer"))
    finally:
        # The root file system keeps the layers now (or nothing needs them any more).
        await story.undo("storaged", "release_layers", lease=lease)
