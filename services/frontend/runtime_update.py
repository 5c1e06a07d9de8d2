"""UpdateRuntimeConfig: the kubelet hands over the node's pod CIDR; netd gives it to CNI as `ipRanges`."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method


@cri_method("UpdateRuntimeConfig")
async def update_runtime_config(request: api_pb2.UpdateRuntimeConfigRequest,
                                call: CallContext) -> api_pb2.UpdateRuntimeConfigResponse:
    cidr = request.runtime_config.network_config.pod_cidr
    # An empty CIDR says nothing about the network: keep what netd has.
    if cidr:
        await call.daemon("netd", "update_pod_cidr", cidr=cidr)
    return api_pb2.UpdateRuntimeConfigResponse()
