"""RemovePodSandbox: stop it, then detach its network while each container goes with its rootfs
(all at once), then remove the pod.

Idempotent: a pod already gone is success.
"""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from shared.errors import InvalidArgument
from shared.together import together


@cri_method("RemovePodSandbox")
async def remove_pod_sandbox(request: api_pb2.RemovePodSandboxRequest,
                             call: CallContext) -> api_pb2.RemovePodSandboxResponse:
    pod_id = request.pod_sandbox_id
    if not pod_id:
        raise InvalidArgument("pod_sandbox_id is required")
    stopped = await call.daemon("runtimed", "stop_sandbox", sandbox_id=pod_id)
    # The full id when the pod was named by a unique prefix.
    pod_id = stopped.get("id") or pod_id

    async def remove_container(container_id: str) -> None:
        await call.daemon("runtimed", "remove_container", container_id=container_id)
        await call.daemon("storaged", "remove_rootfs", container_id=container_id)

    async def remove_containers() -> None:
        containers = await call.daemon("runtimed", "list_containers", filter={"pod_sandbox_id": pod_id})
        await together(*(remove_container(c["id"]) for c in containers if c["pod_sandbox_id"] == pod_id))

    # The containers are stopped: their network can go while they are removed.
    await together(call.daemon("netd", "detach", pod_id=pod_id), remove_containers())
    removed = await call.daemon("runtimed", "remove_sandbox", sandbox_id=pod_id)
    # Containers whose creation never finished are not listed; their rootfs goes too.
    await together(*(call.daemon("storaged", "remove_rootfs", container_id=container_id)
                     for container_id in removed.get("removed_containers") or []))
    return api_pb2.RemovePodSandboxResponse()
