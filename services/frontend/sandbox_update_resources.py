"""UpdatePodSandboxResources: pod-level cgroup limits, applied by runtimed."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from services.frontend.runtime_convert import to_dict
from shared.errors import InvalidArgument


@cri_method("UpdatePodSandboxResources")
async def update_pod_sandbox_resources(request: api_pb2.UpdatePodSandboxResourcesRequest,
                                       call: CallContext) -> api_pb2.UpdatePodSandboxResourcesResponse:
    if not request.pod_sandbox_id:
        raise InvalidArgument("pod_sandbox_id is required")
    await call.daemon("runtimed", "update_sandbox_resources", sandbox_id=request.pod_sandbox_id,
                      resources=to_dict(request.resources) if request.HasField("resources") else {},
                      overhead=to_dict(request.overhead) if request.HasField("overhead") else {})
    return api_pb2.UpdatePodSandboxResourcesResponse()
