"""PortForward: validate the pod, then hand out a single-use streaming URL for its ports."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from services.frontend.streaming import streaming_server
from shared.errors import FailedPrecondition, InvalidArgument


@cri_method("PortForward")
async def port_forward(request: api_pb2.PortForwardRequest, call: CallContext) -> api_pb2.PortForwardResponse:
    if not request.pod_sandbox_id:
        raise InvalidArgument("pod_sandbox_id is required")
    for port in request.port:
        if not 0 < port < 65536:
            raise InvalidArgument(f"port {port} is not a valid TCP port")
    status = (await call.daemon("runtimed", "sandbox_status", sandbox_id=request.pod_sandbox_id))["status"]
    if status.get("state") != "SANDBOX_READY":
        raise FailedPrecondition(f"pod sandbox {request.pod_sandbox_id} is not ready")
    options = ((status.get("linux") or {}).get("namespaces") or {}).get("options") or {}
    server = await streaming_server(call.config, call.daemons)
    url = server.url("portforward", {"pod_id": status["id"], "ports": list(request.port),
                                     "host_network": options.get("network") == "NODE"})
    return api_pb2.PortForwardResponse(url=url)
