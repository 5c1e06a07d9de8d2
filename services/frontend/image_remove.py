"""RemoveImage: refuse images that containers use, then drop layers no image needs any more."""

from __future__ import annotations

import structlog
from cri_api.v1 import api_pb2

from services.frontend import image_layers
from services.frontend.image_convert import image_reference
from services.frontend.registry import CallContext, cri_method

log = structlog.get_logger(__name__)


@cri_method("RemoveImage")
async def remove_image(request: api_pb2.RemoveImageRequest, call: CallContext) -> api_pb2.RemoveImageResponse:
    reference = image_reference(request.image)
    containers = await call.daemon("runtimed", "list_containers")
    # Any container, running or not, keeps its image (as containers/storage does).
    in_use = sorted({v for c in containers for v in (c.get("image_id"), c.get("image_ref"))
                     if isinstance(v, str) and v.startswith("sha256:")})
    removed = await call.daemon("imaged", "remove_image", reference=reference, in_use=in_use)
    # Also when the image was already gone: a removal whose layer collection
    # failed is finished by the kubelet's retry.
    if removed.get("deleted") or removed.get("image_id") is None:
        gc = await image_layers.collect(call.daemon)
        log.info("image_layers_collected", image=reference, removed=len((gc or {}).get("removed", [])))
    return api_pb2.RemoveImageResponse()
