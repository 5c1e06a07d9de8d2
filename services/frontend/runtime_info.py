"""Version, Status and RuntimeConfig: what the kubelet asks about the runtime itself.

Status answers from the health probes the read model makes beside the requests
(health_watch.py) when it has recent ones; verbose Status asks every daemon now.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from shared.errors import CriopyError
from shared.version import KUBE_API_VERSION, RUNTIME_API_VERSION, RUNTIME_NAME, VERSION


# The same for the life of the process; gRPC only reads a response it is given.
_VERSION = api_pb2.VersionResponse(
    version=KUBE_API_VERSION, runtime_name=RUNTIME_NAME,
    runtime_version=VERSION, runtime_api_version=RUNTIME_API_VERSION)


@cri_method("Version")
async def version(_request: api_pb2.VersionRequest, _call: CallContext) -> api_pb2.VersionResponse:
    return _VERSION


async def _health(call: CallContext, daemon: str) -> dict[str, Any]:
    try:
        return await call.daemons.health(daemon)
    except CriopyError as e:
        return {"service": daemon, "ready": False, "error": e.message}


async def _runtimed_and_netd(call: CallContext, verbose: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    model = call.daemons.model
    if model is not None and not verbose:
        runtimed, netd = model.health.current("runtimed"), model.health.current("netd")
        if runtimed is not None and netd is not None:
            return runtimed, netd
    runtimed, netd = await asyncio.gather(_health(call, "runtimed"), _health(call, "netd"))
    return runtimed, netd


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


def _runtime_handlers(health: dict[str, Any]) -> list[api_pb2.RuntimeHandler]:
    """One entry per configured handler, and the default one again with an empty name (as CRI-O does).

    runtimed examined each handler when it started (or reloaded them): its health carries the result.
    """
    handlers = []
    for found in health.get("runtime_handlers") or []:
        features = api_pb2.RuntimeHandlerFeatures(
            recursive_read_only_mounts=bool(found.get("recursive_read_only_mounts")), user_namespaces=False)
        handlers.append(api_pb2.RuntimeHandler(name=found["name"], features=features))
        if found["name"] == health.get("default_runtime_handler"):
            handlers.append(api_pb2.RuntimeHandler(name="", features=features))
    return handlers


@cri_method("Status")
async def status(request: api_pb2.StatusRequest, call: CallContext) -> api_pb2.StatusResponse:
    runtimed, netd = await _runtimed_and_netd(call, request.verbose)
    response = api_pb2.StatusResponse(
        status=api_pb2.RuntimeStatus(conditions=[_runtime_condition(runtimed), _network_condition(netd)]),
        runtime_handlers=_runtime_handlers(runtimed),
        features=api_pb2.RuntimeFeatures(supplemental_groups_policy=True))
    if request.verbose:
        others = await asyncio.gather(_health(call, "imaged"), _health(call, "storaged"))
        services = {h["service"]: h for h in (runtimed, netd, *others)}
        response.info["services"] = json.dumps(services, sort_keys=True)
        response.info["config"] = json.dumps(call.config.to_dict(), sort_keys=True)
        # Not "features": crictl info puts the info map's keys beside the response's own features.
        response.info["detectedFeatures"] = json.dumps({
            "hugetlb": runtimed.get("hugetlb") or {"usable": False, "reason": "runtimed did not answer"},
            "runtime_handlers": runtimed.get("runtime_handlers") or [],
        }, sort_keys=True)
    return response


@cri_method("RuntimeConfig")
async def runtime_config(_request: api_pb2.RuntimeConfigRequest, call: CallContext) -> api_pb2.RuntimeConfigResponse:
    driver = (api_pb2.CgroupDriver.SYSTEMD if call.config.crio.runtime.cgroup_manager == "systemd"
              else api_pb2.CgroupDriver.CGROUPFS)
    return api_pb2.RuntimeConfigResponse(linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=driver))
