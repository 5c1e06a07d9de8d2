"""ListImages: the ready images, optionally those one reference names; from the read model when it can
answer (image_view.py), else from imaged."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.image_convert import complete_sizes, to_image
from services.frontend.registry import CallContext, cri_method


@cri_method("ListImages")
async def list_images(request: api_pb2.ListImagesRequest, call: CallContext) -> api_pb2.ListImagesResponse:
    reference = request.filter.image.image if request.HasField("filter") else ""
    images = await call.mirrored("imaged")
    answer = images.list_images(reference) if images is not None else None
    if answer is not None:
        return answer
    records = await call.daemon("imaged", "list_images", reference=reference or None)
    await complete_sizes(call, records)
    return api_pb2.ListImagesResponse(images=[to_image(r) for r in records])
