"""RemovePodSandbox: stop it, detach its network, remove each container and its rootfs, remove the pod.

Idempotent: a pod already gone is success.
"""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from shared.errors import InvalidArgument


@cri_method("RemovePodSandbox")
async def remove_pod_sandbox(request: api_pb2.RemovePodSandboxRequest,
                             call: CallContext) -> api_pb2.RemovePodSandboxResponse:
    pod_id = request.pod_sandbox_id
    if not pod_id:
        raise InvalidArgument("pod_sandbox_id is required")
    stopped = await call.daemon("runtimed", "stop_sandbox", sandbox_id=pod_id)
    # The full id when the pod was named by a unique prefix.
    pod_id = stopped.get("id") or pod_id
    await call.daemon("netd", "detach", pod_id=pod_id)
    containers = await call.daemon("runtimed", "list_containers", filter={"pod_sandbox_id": pod_id})
    for container in containers:
        if container["pod_sandbox_id"] != pod_id:
            continue
        await call.daemon("runtimed", "remove_container", container_id=container["id"])
        await call.daemon("storaged", "remove_rootfs", container_id=container["id"])
    removed = await call.daemon("runtimed", "remove_sandbox", sandbox_id=pod_id)
    # Containers whose creation never finished are not listed; their rootfs goes too.
    for container_id in removed.get("removed_containers") or []:
        await call.daemon("storaged", "remove_rootfs", container_id=container_id)
    return api_pb2.RemovePodSandboxResponse()
