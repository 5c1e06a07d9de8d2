"""The spec's linux.resources from CRI LinuxContainerResources: CPU, memory, pids, hugepages, unified, OOM score."""

from __future__ import annotations

import os
import re
from typing import Any

from services.runtimed import cgroups
from services.runtimed.spec_security import runtime_capabilities
from services.runtimed.spec_values import i64
from shared.errors import InvalidArgument

MIN_MEMORY_LIMIT = 12 * 1024 * 1024


def _cpuset(value: str, what: str) -> str:
    if value and not re.fullmatch(r"\s*\d+(-\d+)?(\s*,\s*\d+(-\d+)?)*\s*", value):
        raise InvalidArgument(f"{what} is not a cpu/node list: {value!r}")
    return value.replace(" ", "")


def _own_oom_score_adj() -> int:
    try:
        with open("/proc/self/oom_score_adj") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def swap_accounting() -> bool:
    if cgroups.is_v2():
        return True
    directory = cgroups.controller_dir("/", "memory")
    return bool(directory) and os.path.exists(os.path.join(directory, "memory.memsw.limit_in_bytes"))


def linux_resources(res: dict[str, Any] | None, *, pids_limit: int = 0, available: frozenset[str] | None = None,
                    hugetlb: bool = True) -> tuple[dict[str, Any], int | None]:
    """The spec's linux.resources from CRI LinuxContainerResources, and the oom_score_adj.

    `hugetlb`: whether runc can set hugepage limits here; the kubelet sends them
    for every page size the node has, and where the controller is not usable
    they are checked, then left out, rather than failing every container.
    """
    res = res or {}
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    shares = i64(res.get("cpu_shares"), "cpu_shares", 0)
    quota = i64(res.get("cpu_quota"), "cpu_quota", 0)
    period = i64(res.get("cpu_period"), "cpu_period", 0)
    if shares < 0 or period < 0:
        raise InvalidArgument("cpu_shares and cpu_period may not be negative")
    if quota < -1:
        raise InvalidArgument(f"cpu_quota may not be below -1: {quota}")
    if shares:
        cpu["shares"] = max(2, min(shares, 262144))
    if quota:
        cpu["quota"] = quota
    if period:
        if not 1000 <= period <= 1_000_000:
            raise InvalidArgument(f"cpu_period must be between 1000 and 1000000 microseconds: {period}")
        cpu["period"] = period
    if res.get("cpuset_cpus"):
        cpu["cpus"] = _cpuset(res["cpuset_cpus"], "cpuset_cpus")
    if res.get("cpuset_mems"):
        cpu["mems"] = _cpuset(res["cpuset_mems"], "cpuset_mems")
    if cpu:
        out["cpu"] = cpu
    memory: dict[str, Any] = {}
    limit = i64(res.get("memory_limit_in_bytes"), "memory_limit_in_bytes", 0)
    swap = i64(res.get("memory_swap_limit_in_bytes"), "memory_swap_limit_in_bytes", 0)
    if limit < 0 or swap < -1:
        raise InvalidArgument("memory limits may not be negative")
    if limit:
        if limit < MIN_MEMORY_LIMIT:
            raise InvalidArgument(f"memory limit {limit} is below the minimum of {MIN_MEMORY_LIMIT} bytes (12MiB)")
        memory["limit"] = limit
        if swap_accounting():
            if swap and swap != -1 and swap < limit:
                raise InvalidArgument(f"memory_swap_limit_in_bytes ({swap}) is below memory_limit_in_bytes ({limit})")
            memory["swap"] = swap or limit
    elif swap:
        raise InvalidArgument("memory_swap_limit_in_bytes needs memory_limit_in_bytes")
    if memory:
        out["memory"] = memory
    if pids_limit > 0:
        out["pids"] = {"limit": pids_limit}
    hugepages = []
    for i, hp in enumerate(res.get("hugepage_limits") or []):
        size = hp.get("page_size", "")
        if not re.fullmatch(r"\d+[KMG]B", size or ""):
            raise InvalidArgument(f"hugepage_limits[{i}].page_size is not like 2MB: {size!r}")
        hugepages.append({"pageSize": size, "limit": i64(hp.get("limit"), "hugepage limit", 0)})
    if hugepages and hugetlb:
        out["hugepageLimits"] = hugepages
    unified = res.get("unified") or {}
    if unified:
        for key, value in unified.items():
            if "/" in key or "." not in key or not isinstance(value, str):
                raise InvalidArgument(f"invalid unified cgroup key {key!r}")
        if cgroups.is_v2():
            out["unified"] = dict(unified)
    oom = i64(res.get("oom_score_adj"), "oom_score_adj", None)
    if oom is not None:
        if not -1000 <= oom <= 1000:
            raise InvalidArgument(f"oom_score_adj must be between -1000 and 1000: {oom}")
        caps = available if available is not None else runtime_capabilities()
        if "CAP_SYS_RESOURCE" not in caps:
            # Without CAP_SYS_RESOURCE the kernel refuses to lower it below our own.
            oom = max(oom, _own_oom_score_adj())
    return out, oom
