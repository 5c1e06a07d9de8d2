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

While imaged downloads a pull's layers, `EarlyUnpacks` has storaged unpack
them under the pull's lease as they arrive: each time the stored layers reach
further up from the bottom, that stack is unpacked, so that the pull's own
unpack at the end finds most of its work done.

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


class EarlyUnpacks:
    """The layers of a running pull unpacked as imaged stores them (see the module's description)."""

    def __init__(self, story: Story, lease: str) -> None:
        self.story = story
        self.lease = lease
        # Chain ids the early unpacks made or found, for the undo of a pull that fails.
        self.chain_ids: set[str] = set()
        self.error: BaseException | None = None
        self._stack = 0  # layers from the bottom handed to storaged so far
        self._unpacks: list[asyncio.Task[None]] = []

    async def follow(self, reference: str, auth: dict[str, Any] | None) -> None:
        """Until the pull ends: ask imaged what it stored, unpack what can be. Raises nothing: a
        failure to follow only loses the head start, an unpack's failure is kept for `check`."""
        known = 0
        try:
            while self.error is None:
                progress = await self.story.step("imaged", "pull_progress", reference=reference, auth=auth,
                                                 fetched=known)
                if progress is None:
                    break
                known = len(progress["fetched"])
                self._offer(progress["layers"], set(progress["fetched"]))
        except Exception as e:
            log.info("pull_progress_lost", image=reference, error=str(e))
        await asyncio.gather(*self._unpacks, return_exceptions=True)

    def _offer(self, layers: list[dict[str, Any]], fetched: set[int]) -> None:
        stack = 0
        while stack < len(layers) and stack in fetched:
            stack += 1
        if stack > self._stack:
            self._stack = stack
            self._unpacks.append(asyncio.ensure_future(self._unpack(layers[:stack])))

    async def _unpack(self, layers: list[dict[str, Any]]) -> None:
        try:
            unpacked = await unpack(self.story, layers, self.lease)
            self.chain_ids.update(unpacked["chain_ids"])
        except BaseException as e:
            self.error = self.error or e

    def check(self) -> None:
        """Raise the failure of an early unpack (a layer storaged refused)."""
        if self.error is not None:
            raise self.error


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
