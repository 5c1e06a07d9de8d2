"""ContainerStatus and ListContainers: from the read model (runtime_view.py), or one hop to runtimed;
verbose status always asks runtimed (it reads the container's spec)."""

from __future__ import annotations

from typing import Any

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from services.frontend.runtime_convert import to_message
from shared.errors import InvalidArgument


@cri_method("ContainerStatus")
async def container_status(request: api_pb2.ContainerStatusRequest,
                           call: CallContext) -> api_pb2.ContainerStatusResponse:
    if not request.container_id:
        raise InvalidArgument("container_id is required")
    if not request.verbose:
        containers = await call.mirrored("runtimed")
        if containers is not None:
            return containers.container_status(request.container_id)
    result = await call.daemon("runtimed", "container_status", container_id=request.container_id,
                               verbose=request.verbose)
    response = api_pb2.ContainerStatusResponse(status=to_message(result["status"], api_pb2.ContainerStatus))
    if request.verbose:
        response.info.update(result.get("info") or {})
    return response


def container_filter(f: api_pb2.ContainerFilter) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.id:
        out["id"] = f.id
    if f.pod_sandbox_id:
        out["pod_sandbox_id"] = f.pod_sandbox_id
    if f.HasField("state"):
        out["state"] = api_pb2.ContainerState.Name(f.state.state)
    if f.label_selector:
        out["label_selector"] = dict(f.label_selector)
    return out


@cri_method("ListContainers")
async def list_containers(request: api_pb2.ListContainersRequest, call: CallContext) -> api_pb2.ListContainersResponse:
    containers = await call.mirrored("runtimed")
    if containers is not None:
        return containers.list_containers(request.filter if request.HasField("filter") else None)
    flt = container_filter(request.filter) if request.HasField("filter") else {}
    items = await call.daemon("runtimed", "list_containers", filter=flt)
    return api_pb2.ListContainersResponse(containers=[to_message(i, api_pb2.Container) for i in items])
