"""ImageFsInfo: the image store (imaged's blobs plus storaged's layers) and the containers' layers.

Measuring walks the stores, so an answer is reused for a short while when nothing changed (answer_cache.py).
"""

from __future__ import annotations

import asyncio
import os

from cri_api.v1 import api_pb2

from services.frontend.image_convert import filesystem_usage
from services.frontend.registry import CallContext, cri_method


@cri_method("ImageFsInfo")
async def image_fs_info(_request: api_pb2.ImageFsInfoRequest, call: CallContext) -> api_pb2.ImageFsInfoResponse:
    return await call.reused("ImageFsInfo", lambda: _measure(call))


async def _measure(call: CallContext) -> api_pb2.ImageFsInfoResponse:
    blobs, layers = await asyncio.gather(call.daemon("imaged", "fs_info"), call.daemon("storaged", "fs_info"))
    # Both stores live under the root directory: the kubelet maps that one mountpoint to a device.
    root = os.path.commonpath([blobs["mountpoint"], layers["mountpoint"]])
    images = filesystem_usage(root, blobs["used_bytes"] + layers["used_bytes"],
                              blobs["inodes_used"] + layers["inodes_used"],
                              max(blobs["timestamp_ns"], layers["timestamp_ns"]))
    response = api_pb2.ImageFsInfoResponse(image_filesystems=[images])
    containers = layers.get("containers")
    if containers:
        response.container_filesystems.append(filesystem_usage(
            containers["mountpoint"], containers["used_bytes"], containers["inodes_used"], layers["timestamp_ns"]))
    return response
