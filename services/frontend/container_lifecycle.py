"""StartContainer, StopContainer and RemoveContainer (whose rootfs storaged then releases).

Stop and Remove of a container that does not exist succeed, as the CRI asks: the
kubelet retries them after a restart and must not see NotFound.
"""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from shared.errors import InvalidArgument


def _id(container_id: str) -> str:
    if not container_id:
        raise InvalidArgument("container_id is required")
    return container_id


@cri_method("StartContainer")
async def start_container(request: api_pb2.StartContainerRequest, call: CallContext) -> api_pb2.StartContainerResponse:
    await call.daemon("runtimed", "start_container", container_id=_id(request.container_id))
    return api_pb2.StartContainerResponse()


@cri_method("StopContainer")
async def stop_container(request: api_pb2.StopContainerRequest, call: CallContext) -> api_pb2.StopContainerResponse:
    await call.daemon("runtimed", "stop_container", container_id=_id(request.container_id),
                      timeout=max(0, int(request.timeout)))
    return api_pb2.StopContainerResponse()


@cri_method("RemoveContainer")
async def remove_container(request: api_pb2.RemoveContainerRequest,
                           call: CallContext) -> api_pb2.RemoveContainerResponse:
    container_id = _id(request.container_id)
    removed = await call.daemon("runtimed", "remove_container", container_id=container_id)
    # The full id when runtimed knew the container by a prefix; a rootfs whose record is
    # gone (a create cut off before runtimed kept it) is still released by the given id.
    await call.daemon("storaged", "remove_rootfs", container_id=removed.get("id") or container_id)
    return api_pb2.RemoveContainerResponse()
