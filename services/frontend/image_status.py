"""ImageStatus: an empty response (not an error) for a missing image, as the kubelet expects.

Answered from the read model when it knows the reference (image_view.py); verbose
status, and any reference it does not know, from imaged."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.image_convert import complete_sizes, image_reference, to_image, verbose_info
from services.frontend.registry import CallContext, cri_method


@cri_method("ImageStatus")
async def image_status(request: api_pb2.ImageStatusRequest, call: CallContext) -> api_pb2.ImageStatusResponse:
    reference = image_reference(request.image)
    if not request.verbose:
        images = await call.mirrored("imaged")
        answer = images.image_status(reference) if images is not None else None
        if answer is not None:
            return answer
    record = await call.daemon("imaged", "image_status", reference=reference, verbose=request.verbose)
    if record is None:
        return api_pb2.ImageStatusResponse()
    await complete_sizes(call, [record])
    response = api_pb2.ImageStatusResponse(image=to_image(record))
    if request.verbose:
        response.info.update(verbose_info(record))
    return response
