"""PullImage: imaged fetches and verifies, storaged unpacks, imaged marks the image ready."""

from __future__ import annotations

import structlog
from cri_api.v1 import api_pb2

from services.frontend.image_convert import auth_params, image_reference
from services.frontend.registry import CallContext, cri_method
from services.frontend.runtime_convert import Story
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
    # A failed fetch leaves no temporary file (nor, on a full disk, its blobs); a failed unpack no layer.
    pulled = await call.daemon("imaged", "pull", reference=reference, auth=auth_params(auth))
    image_id = pulled["image_id"]
    unpacked = None
    try:
        unpacked = await call.daemon("storaged", "unpack", layers=pulled["layers"])
        # The image's size is its layers as unpacked: storaged measured them, imaged keeps the record.
        await call.daemon("imaged", "set_top_layer", image_id=image_id, top_layer=unpacked.get("top_layer"),
                          unpacked_size=unpacked["unpacked_size"])
        await call.daemon("imaged", "mark_ready", image_id=image_id)
    except CriopyError:
        # A pull that fails leaves the stores as it found them: the record that never became
        # ready goes, with the blobs only it needed, then the layers unpacked for it that no
        # other image uses. A retry starts over (a full disk needs that room back).
        story = Story(call, f"image {reference}")
        await story.undo("imaged", "abandon", image_id=image_id)
        if unpacked is not None:
            keep = await story.undo("imaged", "top_layers")
            if keep is not None:
                await story.undo("storaged", "gc_layers", keep_top_layers=keep, only=unpacked["chain_ids"])
        raise
    log.info("image_pulled", image=reference, image_id=image_id, layers=len(pulled["layers"]),
             unpacked_size=unpacked["unpacked_size"])
    return image_id
