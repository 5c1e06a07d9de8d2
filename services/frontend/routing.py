"""Which daemon owns each CRI method, and the default route for calls with no handler yet.

A CRI method without its own module is still sent to the daemon that owns it,
with the request as a map; the daemon answers UNIMPLEMENTED until the method
exists there, and that answer reaches the kubelet with a clear message.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.json_format import MessageToDict

from services.frontend.registry import CallContext
from shared.errors import Unimplemented

IMAGE_METHODS = ("ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo")
NETWORK_METHODS = ("PortForward", "UpdateRuntimeConfig")

OWNER: dict[str, str] = {
    **{m: "imaged" for m in IMAGE_METHODS},
    **{m: "netd" for m in NETWORK_METHODS},
}


def owner(method: str) -> str:
    """The daemon that owns a CRI method (runtimed unless said otherwise)."""
    return OWNER.get(method, "runtimed")


def bus_method_name(cri_method: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cri_method).lower()


async def route_to_owner(cri_method: str, request: Any, call: CallContext) -> Any:
    daemon = owner(cri_method)
    try:
        return await call.daemon(daemon, bus_method_name(cri_method),
                                 request=MessageToDict(request, preserving_proto_field_name=True))
    except Unimplemented:
        raise Unimplemented(f"{cri_method} is not implemented by crio-py yet (its owner is {daemon})") from None
