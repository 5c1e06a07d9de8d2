"""CheckpointContainer: CRIU through runtimed, with the writable layer's changes from storaged."""

from __future__ import annotations

import time

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from shared.errors import InvalidArgument


@cri_method("CheckpointContainer")
async def checkpoint_container(request: api_pb2.CheckpointContainerRequest,
                               call: CallContext) -> api_pb2.CheckpointContainerResponse:
    if not request.container_id:
        raise InvalidArgument("container_id is required")
    if not request.location:
        raise InvalidArgument("location (the checkpoint archive to write) is required")
    status = await call.daemon("runtimed", "container_status", container_id=request.container_id)
    container_id = status["status"]["id"]
    rootfs = await call.daemon("storaged", "rootfs_status", container_id=container_id)
    # The kubelet's timeout (seconds) may be longer than the gRPC deadline it set.
    deadline = max(call.deadline, time.time() + request.timeout) if request.timeout > 0 else call.deadline
    await call.daemons.call("runtimed", "checkpoint_container", deadline=deadline, container_id=container_id,
                            location=request.location, upper_dir=(rootfs or {}).get("upper_dir"),
                            timeout=max(1.0, deadline - time.time() - 1.0))
    return api_pb2.CheckpointContainerResponse()
