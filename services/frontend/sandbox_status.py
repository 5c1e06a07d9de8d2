"""PodSandboxStatus and ListPodSandbox: from the read model (runtime_view.py), or one hop to runtimed,
which keeps the pod's IPs from netd; verbose status always asks runtimed (it reads the pod's files)."""

from __future__ import annotations

from typing import Any

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from services.frontend.runtime_convert import to_message
from shared.errors import InvalidArgument


@cri_method("PodSandboxStatus")
async def pod_sandbox_status(request: api_pb2.PodSandboxStatusRequest,
                             call: CallContext) -> api_pb2.PodSandboxStatusResponse:
    if not request.pod_sandbox_id:
        raise InvalidArgument("pod_sandbox_id is required")
    if not request.verbose:
        pods = await call.mirrored("runtimed")
        if pods is not None:
            return pods.pod_status(request.pod_sandbox_id)
    result = await call.daemon("runtimed", "sandbox_status", sandbox_id=request.pod_sandbox_id,
                               verbose=request.verbose)
    response = api_pb2.PodSandboxStatusResponse(status=to_message(result["status"], api_pb2.PodSandboxStatus))
    if request.verbose:
        response.info.update(result.get("info") or {})
    return response


def sandbox_filter(f: api_pb2.PodSandboxFilter) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.id:
        out["id"] = f.id
    if f.HasField("state"):
        out["state"] = api_pb2.PodSandboxState.Name(f.state.state)
    if f.label_selector:
        out["label_selector"] = dict(f.label_selector)
    return out


@cri_method("ListPodSandbox")
async def list_pod_sandbox(request: api_pb2.ListPodSandboxRequest, call: CallContext) -> api_pb2.ListPodSandboxResponse:
    pods = await call.mirrored("runtimed")
    if pods is not None:
        return pods.list_pods(request.filter if request.HasField("filter") else None)
    flt = sandbox_filter(request.filter) if request.HasField("filter") else {}
    items = await call.daemon("runtimed", "list_sandboxes", filter=flt)
    return api_pb2.ListPodSandboxResponse(items=[to_message(i, api_pb2.PodSandbox) for i in items])
