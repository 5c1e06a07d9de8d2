"""UpdateContainerResources: new cgroup limits applied live by runtimed (runc update)."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from services.frontend.runtime_convert import to_dict
from shared.errors import InvalidArgument


@cri_method("UpdateContainerResources")
async def update_container_resources(request: api_pb2.UpdateContainerResourcesRequest,
                                     call: CallContext) -> api_pb2.UpdateContainerResourcesResponse:
    if not request.container_id:
        raise InvalidArgument("container_id is required")
    await call.daemon("runtimed", "update_resources", container_id=request.container_id,
                      linux=to_dict(request.linux), annotations=dict(request.annotations))
    return api_pb2.UpdateContainerResourcesResponse()
