"""Changing a pod's own cgroup limits (UpdatePodSandboxResources), cgroupfs driver, v1 and v2."""

from __future__ import annotations

import os
from typing import Any

import structlog

from services.runtimed import cgroups
from shared.errors import FailedPrecondition, Internal, InvalidArgument

log = structlog.get_logger(__name__)


def _int(resources: dict[str, Any], key: str) -> int | None:
    value = resources.get(key)
    if value in (None, "", 0, "0"):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{key} must be an integer: {value!r}") from None


def cgroup_writes(resources: dict[str, Any], *, v2: bool) -> list[tuple[str, str, str]]:
    """(controller, file, value) to write for CRI LinuxContainerResources; nothing for unset fields."""
    writes: list[tuple[str, str, str]] = []
    shares = _int(resources, "cpu_shares")
    quota = _int(resources, "cpu_quota")
    period = _int(resources, "cpu_period")
    memory = _int(resources, "memory_limit_in_bytes")
    for key, value in (("cpu_shares", shares), ("cpu_period", period), ("memory_limit_in_bytes", memory)):
        if value is not None and value < 0:
            raise InvalidArgument(f"{key} must not be negative: {value}")
    if shares is not None and not 2 <= shares <= 262144:
        raise InvalidArgument(f"cpu_shares must be between 2 and 262144: {shares}")
    if v2:
        if shares is not None:
            writes.append(("cpu", "cpu.weight", str(1 + ((shares - 2) * 9999) // 262142)))
        if quota is not None or period is not None:
            writes.append(("cpu", "cpu.max", f"{'max' if quota is None or quota < 0 else quota} {period or 100000}"))
        if memory is not None:
            writes.append(("memory", "memory.max", str(memory)))
    else:
        if shares is not None:
            writes.append(("cpu", "cpu.shares", str(shares)))
        if period is not None:
            writes.append(("cpu", "cpu.cfs_period_us", str(period)))
        if quota is not None:
            writes.append(("cpu", "cpu.cfs_quota_us", str(quota)))
        if memory is not None:
            writes.append(("memory", "memory.limit_in_bytes", str(memory)))
    for key, name in (("cpuset_cpus", "cpuset.cpus"), ("cpuset_mems", "cpuset.mems")):
        if resources.get(key):
            writes.append(("cpuset", name, str(resources[key])))
    return writes


def apply(path: str, resources: dict[str, Any]) -> list[str]:
    """Write the limits into the pod's cgroup `path`; the files written."""
    v2 = cgroups.is_v2()
    written = []
    for controller, name, value in cgroup_writes(resources, v2=v2):
        directory = cgroups.controller_dir(path, controller)
        if directory is None or not os.path.isdir(directory):
            raise FailedPrecondition(f"the pod cgroup {path} has no {controller} controller")
        target = os.path.join(directory, name)
        try:
            with open(target, "w") as f:
                f.write(value)
        except OSError as e:
            raise Internal(f"setting {name}={value} on pod cgroup {path}: {e.strerror}") from None
        written.append(target)
    log.info("pod_resources_updated", cgroup=path, files=[os.path.basename(w) for w in written])
    return written
