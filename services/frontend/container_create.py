"""CreateContainer: runtimed reserves the name while imaged finds the image -> storaged makes the
rootfs -> runtimed builds the OCI spec and creates the container under conmon.

A retry with the same name while the first call still runs waits for it and
gets the same container. Each step is undone when a later one fails.
"""

from __future__ import annotations

import asyncio

from cri_api.v1 import api_pb2

from services.frontend import image_layers
from services.frontend.registry import CallContext, cri_method
from services.frontend.runtime_convert import Story, detached, note_if_stalled, remaining, to_dict
from shared.errors import InvalidArgument, NotFound


@cri_method("CreateContainer")
async def create_container(request: api_pb2.CreateContainerRequest,
                           call: CallContext) -> api_pb2.CreateContainerResponse:
    config = request.config
    if not request.pod_sandbox_id:
        raise InvalidArgument("pod_sandbox_id is required")
    if not config.metadata.name:
        raise InvalidArgument("container metadata needs a name")
    image = config.image.image
    if not image:
        raise InvalidArgument("container config needs an image")
    key = f"container {request.pod_sandbox_id}/{config.metadata.name}/{config.metadata.attempt}"
    note_if_stalled(key)
    reserved, record = await asyncio.gather(
        call.daemon("runtimed", "reserve_container", sandbox_id=request.pod_sandbox_id,
                    config=to_dict(config), timeout=remaining(call), token=call.request_id,
                    holder=call.daemons.instance),
        call.daemon("imaged", "image_status", reference=image), return_exceptions=True)
    if isinstance(reserved, BaseException):
        raise reserved  # the reservation's refusal comes first, whatever the image
    container_id = reserved["id"]
    if not reserved["created"]:
        return api_pb2.CreateContainerResponse(container_id=container_id)
    story = Story(call, key)

    async def make() -> None:
        rootfs_made = False
        try:
            if isinstance(record, BaseException):
                raise record
            if record is None:
                raise NotFound(f"image {image} is not pulled")
            rootfs = await image_layers.create_rootfs(story, container_id, record)
            rootfs_made = True
            await story.step("runtimed", "create_container", container_id=container_id,
                             rootfs=rootfs["rootfs"], image=record)
        except BaseException:
            if rootfs_made:
                await story.undo("storaged", "remove_rootfs", container_id=container_id)
            await story.undo("runtimed", "release_container", container_id=container_id)
            raise

    await detached(story, make)
    return api_pb2.CreateContainerResponse(container_id=container_id)
