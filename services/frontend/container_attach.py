"""Attach: validate, then hand out a single-use streaming URL to the container's stdio."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.container_exec import check_streams, running_container
from services.frontend.registry import CallContext, cri_method
from services.frontend.streaming import streaming_server


@cri_method("Attach")
async def attach(request: api_pb2.AttachRequest, call: CallContext) -> api_pb2.AttachResponse:
    check_streams(request.stdin, request.stdout, request.stderr, request.tty)
    container_id = await running_container(call, request.container_id)
    server = await streaming_server(call.config, call.daemons)
    url = server.url("attach", {"container_id": container_id, "tty": request.tty, "stdin": request.stdin,
                                "stdout": request.stdout, "stderr": request.stderr})
    return api_pb2.AttachResponse(url=url)
