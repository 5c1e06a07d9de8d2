"""Version, Status and RuntimeConfig: what the kubelet asks about the runtime itself."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from shared.errors import CriopyError
from shared.version import KUBE_API_VERSION, RUNTIME_API_VERSION, RUNTIME_NAME, VERSION


@cri_method("Version")
async def version(_request: api_pb2.VersionRequest, _call: CallContext) -> api_pb2.VersionResponse:
    return api_pb2.VersionResponse(
        version=KUBE_API_VERSION, runtime_name=RUNTIME_NAME,
        runtime_version=VERSION, runtime_api_version=RUNTIME_API_VERSION)


async def _health(call: CallContext, daemon: str) -> dict[str, Any]:
    try:
        return await call.daemons.health(daemon)
    except CriopyError as e:
        return {"service": daemon, "ready": False, "error": e.message}


def _runtime_condition(health: dict[str, Any]) -> api_pb2.RuntimeCondition:
    if health.get("ready"):
        return api_pb2.RuntimeCondition(type="RuntimeReady", status=True)
    return api_pb2.RuntimeCondition(
        type="RuntimeReady", status=False, reason="RuntimedNotReady",
        message=f"runtimed is not ready: {health.get('error', 'still starting')}")


def _network_condition(health: dict[str, Any]) -> api_pb2.RuntimeCondition:
    if not health.get("ready"):
        return api_pb2.RuntimeCondition(
            type="NetworkReady", status=False, reason="NetdNotReady",
            message=f"netd is not ready: {health.get('error', 'still starting')}")
    if not health.get("network_ready"):
        return api_pb2.RuntimeCondition(
            type="NetworkReady", status=False,
            reason=health.get("network_reason") or "NetworkPluginNotReady",
            message=health.get("network_message") or "the network is not configured")
    return api_pb2.RuntimeCondition(type="NetworkReady", status=True)


@cri_method("Status")
async def status(request: api_pb2.StatusRequest, call: CallContext) -> api_pb2.StatusResponse:
    runtimed, netd = await asyncio.gather(_health(call, "runtimed"), _health(call, "netd"))
    response = api_pb2.StatusResponse(status=api_pb2.RuntimeStatus(
        conditions=[_runtime_condition(runtimed), _network_condition(netd)]))
    if request.verbose:
        others = await asyncio.gather(_health(call, "imaged"), _health(call, "storaged"))
        services = {h["service"]: h for h in (runtimed, netd, *others)}
        response.info["services"] = json.dumps(services, sort_keys=True)
        response.info["config"] = json.dumps(call.config.to_dict(), sort_keys=True)
    return response


@cri_method("RuntimeConfig")
async def runtime_config(_request: api_pb2.RuntimeConfigRequest, call: CallContext) -> api_pb2.RuntimeConfigResponse:
    driver = (api_pb2.CgroupDriver.SYSTEMD if call.config.crio.runtime.cgroup_manager == "systemd"
              else api_pb2.CgroupDriver.CGROUPFS)
    return api_pb2.RuntimeConfigResponse(linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=driver))
