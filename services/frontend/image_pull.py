"""PullImage: imaged fetches and verifies, storaged unpacks, imaged marks the image ready."""

from __future__ import annotations

import structlog
from cri_api.v1 import api_pb2

from services.frontend.image_convert import auth_params, image_reference
from services.frontend.registry import CallContext, cri_method
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
    pulled = await call.daemon("imaged", "pull", reference=reference, auth=auth_params(auth))
    image_id = pulled["image_id"]
    # A failed unpack leaves the record not ready (unlisted) and its verified
    # blobs in place: there is nothing to undo, and a repeated pull resumes.
    unpacked = await call.daemon("storaged", "unpack", layers=pulled["layers"])
    # The image's size is its layers as unpacked: storaged measured them, imaged keeps the record.
    await call.daemon("imaged", "set_top_layer", image_id=image_id, top_layer=unpacked.get("top_layer"),
                      unpacked_size=unpacked["unpacked_size"])
    await call.daemon("imaged", "mark_ready", image_id=image_id)
    log.info("image_pulled", image=reference, image_id=image_id, layers=len(pulled["layers"]),
             unpacked_size=unpacked["unpacked_size"])
    return image_id
