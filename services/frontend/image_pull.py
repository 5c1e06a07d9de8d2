"""PullImage: imaged fetches and verifies, storaged unpacks, imaged marks the image ready.

The story runs on when the kubelet gives up (its deadline), so that a pull
either completes (the kubelet's retry joins or finds it) or is undone: a
record that never becomes ready does not stay behind. The unpacked layers
are leased until imaged lists the image (see image_layers.py), so that a
RemoveImage meanwhile cannot delete them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from cri_api.v1 import api_pb2

from services.frontend import image_layers
from services.frontend.image_convert import auth_params, image_reference
from services.frontend.registry import CallContext, cri_method
from services.frontend.runtime_convert import Story, detached
from shared import metrics
from shared.errors import CriopyError

log = structlog.get_logger(__name__)


@cri_method("PullImage")
async def pull_image(request: api_pb2.PullImageRequest, call: CallContext) -> api_pb2.PullImageResponse:
    reference = image_reference(request.image)
    try:
        image_id = await _pull(reference, request.auth, call)
    except CriopyError as e:
        metrics.CRIO_IMAGE_PULLS_FAILURE.labels(metrics.image_pull_failure_reason(e.code, e.message)).inc()
        raise
    metrics.CRIO_IMAGE_PULLS_SUCCESS.inc()
    return api_pb2.PullImageResponse(image_ref=image_id)


async def _pull(reference: str, auth: api_pb2.AuthConfig, call: CallContext) -> str:
    story = Story(call, f"image {reference}")
    lease = f"pull {call.request_id}"

    async def pull() -> str:
        # Layers are unpacked as they arrive (each under the lease), while imaged fetches the rest.
        early = image_layers.EarlyUnpacks(story, lease)
        params = auth_params(auth)
        pulled, _ = await asyncio.gather(story.step("imaged", "pull", reference=reference, auth=params),
                                         early.follow(reference, params), return_exceptions=True)
        if isinstance(pulled, BaseException):
            # A failed fetch leaves no temporary file (nor, on a full disk, its blobs); what was
            # unpacked of it goes too.
            await _undo_unpacks(story, lease, early.chain_ids)
            raise pulled
        image_id = pulled["image_id"]
        unpacked: dict[str, Any] | None = None
        try:
            early.check()
            # Most layers are there by now: this unpacks what is left and measures the stack.
            unpacked = await image_layers.unpack(story, pulled["layers"], lease)
            # The image's size is its layers as unpacked: storaged measured them, imaged keeps the record.
            await story.step("imaged", "set_top_layer", image_id=image_id, top_layer=unpacked.get("top_layer"),
                             unpacked_size=unpacked["unpacked_size"])
            # Its names (a tag that moved) go to it only now.
            await story.step("imaged", "mark_ready", image_id=image_id)
        except BaseException:
            # A pull that fails leaves the stores as it found them: the record that never became
            # ready goes, with the blobs only it needed, then the layers unpacked for it that no
            # other image uses. A retry starts over (a full disk needs that room back).
            await story.undo("imaged", "abandon", image_id=image_id)
            await _undo_unpacks(story, lease, early.chain_ids | set(unpacked["chain_ids"] if unpacked else ()))
            raise
        # imaged lists the image now, and its top layer keeps the layers.
        await image_layers.release(story, lease)
        stray = early.chain_ids - set(unpacked["chain_ids"])
        if stray:  # unpacked from layers a mirror failed over from: no image has them
            await image_layers.collect(story.undo, only=sorted(stray))
        log.info("image_pulled", image=reference, image_id=image_id, layers=len(pulled["layers"]),
                 unpacked_size=unpacked["unpacked_size"])
        return image_id

    return await detached(story, pull, answer_by=call.deadline)


async def _undo_unpacks(story: Story, lease: str, chain_ids: set[str]) -> None:
    """End the pull's lease, and delete the layers it unpacked that nothing else needs."""
    await image_layers.release(story, lease)
    if chain_ids:
        await image_layers.collect(story.undo, only=sorted(chain_ids))
