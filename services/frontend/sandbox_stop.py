"""StopPodSandbox: runtimed stops the pod's containers and infra -> netd tears down its network.

Idempotent as the CRI requires: a pod that is already stopped or gone is success.
"""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from shared.errors import InvalidArgument


@cri_method("StopPodSandbox")
async def stop_pod_sandbox(request: api_pb2.StopPodSandboxRequest, call: CallContext) -> api_pb2.StopPodSandboxResponse:
    if not request.pod_sandbox_id:
        raise InvalidArgument("pod_sandbox_id is required")
    stopped = await call.daemon("runtimed", "stop_sandbox", sandbox_id=request.pod_sandbox_id)
    await call.daemon("netd", "detach", pod_id=stopped.get("id") or request.pod_sandbox_id)
    return api_pb2.StopPodSandboxResponse()
