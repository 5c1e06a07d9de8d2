"""ExecSync: run a command in a container and return its output and exit code."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from shared.errors import InvalidArgument


@cri_method("ExecSync")
async def exec_sync(request: api_pb2.ExecSyncRequest, call: CallContext) -> api_pb2.ExecSyncResponse:
    if not request.container_id:
        raise InvalidArgument("container_id is required")
    if not request.cmd:
        raise InvalidArgument("cmd is required")
    result = await call.daemon("runtimed", "exec_sync", container_id=request.container_id,
                               cmd=list(request.cmd), timeout=float(max(0, request.timeout)))
    return api_pb2.ExecSyncResponse(stdout=result["stdout"], stderr=result["stderr"], exit_code=result["exit_code"])
