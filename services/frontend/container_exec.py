"""Exec: validate, then hand out a single-use streaming URL for the command (streaming/ serves it)."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from services.frontend.streaming import streaming_server
from shared.errors import FailedPrecondition, InvalidArgument


def check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout, and stderr must be set")
    if tty and stderr:
        raise InvalidArgument("tty and stderr cannot both be true")


async def running_container(call: CallContext, container_id: str) -> str:
    """The full id of a running container (NotFound / FailedPrecondition otherwise)."""
    if not container_id:
        raise InvalidArgument("container_id is required")
    status = (await call.daemon("runtimed", "container_status", container_id=container_id))["status"]
    if status.get("state") != "CONTAINER_RUNNING":
        raise FailedPrecondition(f"container {container_id} is not running")
    return status["id"]


@cri_method("Exec")
async def exec_(request: api_pb2.ExecRequest, call: CallContext) -> api_pb2.ExecResponse:
    if not request.cmd:
        raise InvalidArgument("cmd is required")
    check_streams(request.stdin, request.stdout, request.stderr, request.tty)
    container_id = await running_container(call, request.container_id)
    server = await streaming_server(call.config, call.daemons)
    url = server.url("exec", {"container_id": container_id, "cmd": list(request.cmd), "tty": request.tty,
                              "stdin": request.stdin, "stdout": request.stdout, "stderr": request.stderr})
    return api_pb2.ExecResponse(url=url)
