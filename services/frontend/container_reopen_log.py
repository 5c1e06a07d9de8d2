"""ReopenContainerLog: conmon reopens the container's log after the kubelet rotated it."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from shared.errors import InvalidArgument


@cri_method("ReopenContainerLog")
async def reopen_container_log(request: api_pb2.ReopenContainerLogRequest,
                               call: CallContext) -> api_pb2.ReopenContainerLogResponse:
    if not request.container_id:
        raise InvalidArgument("container_id is required")
    await call.daemon("runtimed", "reopen_log", container_id=request.container_id)
    return api_pb2.ReopenContainerLogResponse()
