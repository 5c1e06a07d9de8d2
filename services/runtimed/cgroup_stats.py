"""Resource use read straight from cgroup files (v1 and v2): samples, where to find them, CPU rates.

One sample reads a handful of small files per container: no runc call, no
walk of the cgroup tree. A container's cgroup directories are found once from
/proc/<pid>/cgroup (right for both cgroup drivers) and cached by container id.
CPU use in nanocores is the difference between two samples of the cumulative
usage, kept per container. Everything here blocks on file reads: stats.py runs
it in a thread, one request at a time (the reader's lock).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

import structlog

from services.runtimed import cgroups

log = structlog.get_logger(__name__)

# v1 reports "no limit" as the largest page-aligned int64; anything this big is unlimited.
UNLIMITED = 1 << 62
# Two samples closer than this give a noisy rate: the previous rate is kept instead.
MIN_RATE_INTERVAL_NS = 500_000_000
_USER_HZ = os.sysconf("SC_CLK_TCK")

ALL_FAMILIES = frozenset({"cpu", "memory", "pids"})


@dataclass
class Sample:
    """One reading of a cgroup; a field is None when its file could not be read."""

    timestamp_ns: int
    cpu_usage_ns: int | None = None
    cpu_user_ns: int | None = None
    cpu_system_ns: int | None = None
    cpu_periods: int | None = None
    cpu_throttled_periods: int | None = None
    cpu_throttled_ns: int | None = None
    memory_usage: int | None = None
    memory_working_set: int | None = None
    memory_rss: int | None = None
    memory_cache: int | None = None
    memory_mapped_file: int | None = None
    memory_swap: int | None = None
    memory_limit: int | None = None  # None: unlimited
    memory_max_usage: int | None = None
    memory_failcnt: int | None = None
    memory_active_file: int | None = None
    memory_inactive_file: int | None = None
    memory_active_anon: int | None = None
    memory_inactive_anon: int | None = None
    memory_kernel: int | None = None
    page_faults: int | None = None
    major_page_faults: int | None = None
    oom_kills: int | None = None
    pids: int | None = None

    @property
    def memory_available(self) -> int | None:
        if self.memory_limit is None or self.memory_working_set is None:
            return None
        return max(0, self.memory_limit - self.memory_working_set)


@dataclass(frozen=True)
class CgroupDirs:
    """Where one cgroup's files are: one directory per v1 controller, or the v2 directory."""

    v2: str | None = None
    cpu: str | None = None
    cpuacct: str | None = None
    memory: str | None = None
    pids: str | None = None

    def exists(self) -> bool:
        return any(d is not None and os.path.isdir(d) for d in (self.v2, self.cpuacct, self.memory))


def _read(directory: str | None, name: str) -> str | None:
    if directory is None:
        return None
    try:
        with open(os.path.join(directory, name)) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _keyed(text: str | None) -> dict[str, int]:
    """A "key value" per line file (memory.stat, cpu.stat, memory.events)."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def _limit(value: int | None) -> int | None:
    return None if value is None or value >= UNLIMITED else value


def read_sample(dirs: CgroupDirs, families: Iterable[str] = ALL_FAMILIES) -> Sample:
    """Read the families asked for ("cpu", "memory", "pids") from one cgroup."""
    want = set(families)
    sample = Sample(timestamp_ns=time.time_ns())
    if dirs.v2 is not None:
        _read_v2(dirs.v2, want, sample)
    else:
        _read_v1(dirs, want, sample)
    return sample


def _read_v1(dirs: CgroupDirs, want: set[str], s: Sample) -> None:
    if "cpu" in want:
        s.cpu_usage_ns = _int(_read(dirs.cpuacct, "cpuacct.usage"))
        ticks = _keyed(_read(dirs.cpuacct, "cpuacct.stat"))
        if ticks:
            s.cpu_user_ns = ticks.get("user", 0) * 1_000_000_000 // _USER_HZ
            s.cpu_system_ns = ticks.get("system", 0) * 1_000_000_000 // _USER_HZ
    if "cpu_throttling" in want:
        throttling = _keyed(_read(dirs.cpu, "cpu.stat"))
        s.cpu_periods = throttling.get("nr_periods")
        s.cpu_throttled_periods = throttling.get("nr_throttled")
        s.cpu_throttled_ns = throttling.get("throttled_time")
    if "memory" in want:
        s.memory_usage = _int(_read(dirs.memory, "memory.usage_in_bytes"))
        stat = _keyed(_read(dirs.memory, "memory.stat"))
        inactive = stat.get("total_inactive_file", 0)
        if s.memory_usage is not None:
            s.memory_working_set = max(0, s.memory_usage - inactive)
        s.memory_rss = stat.get("total_rss")
        s.memory_cache = stat.get("total_cache")
        s.memory_mapped_file = stat.get("total_mapped_file")
        s.memory_swap = stat.get("total_swap")
        s.memory_active_file = stat.get("total_active_file")
        s.memory_inactive_file = stat.get("total_inactive_file")
        s.memory_active_anon = stat.get("total_active_anon")
        s.memory_inactive_anon = stat.get("total_inactive_anon")
        s.page_faults = stat.get("total_pgfault")
        s.major_page_faults = stat.get("total_pgmajfault")
        s.memory_limit = _limit(stat.get("hierarchical_memory_limit"))
    if "memory_extra" in want:
        s.memory_max_usage = _int(_read(dirs.memory, "memory.max_usage_in_bytes"))
        s.memory_failcnt = _int(_read(dirs.memory, "memory.failcnt"))
        s.memory_kernel = _int(_read(dirs.memory, "memory.kmem.usage_in_bytes"))
    if "oom" in want:
        s.oom_kills = _keyed(_read(dirs.memory, "memory.oom_control")).get("oom_kill")
    if "pids" in want:
        s.pids = _int(_read(dirs.pids, "pids.current"))


def _read_v2(directory: str, want: set[str], s: Sample) -> None:
    if "cpu" in want or "cpu_throttling" in want:
        stat = _keyed(_read(directory, "cpu.stat"))
        if "usage_usec" in stat:
            s.cpu_usage_ns = stat["usage_usec"] * 1000
            s.cpu_user_ns = stat.get("user_usec", 0) * 1000
            s.cpu_system_ns = stat.get("system_usec", 0) * 1000
        s.cpu_periods = stat.get("nr_periods")
        s.cpu_throttled_periods = stat.get("nr_throttled")
        if "throttled_usec" in stat:
            s.cpu_throttled_ns = stat["throttled_usec"] * 1000
    if "memory" in want:
        s.memory_usage = _int(_read(directory, "memory.current"))
        stat = _keyed(_read(directory, "memory.stat"))
        inactive = stat.get("inactive_file", 0)
        if s.memory_usage is not None:
            s.memory_working_set = max(0, s.memory_usage - inactive)
        s.memory_rss = stat.get("anon")
        s.memory_cache = stat.get("file")
        s.memory_mapped_file = stat.get("file_mapped")
        s.memory_active_file = stat.get("active_file")
        s.memory_inactive_file = stat.get("inactive_file")
        s.memory_active_anon = stat.get("active_anon")
        s.memory_inactive_anon = stat.get("inactive_anon")
        s.memory_kernel = stat.get("kernel")
        s.page_faults = stat.get("pgfault")
        s.major_page_faults = stat.get("pgmajfault")
        s.memory_limit = _limit(_int(_read(directory, "memory.max")))
        s.memory_swap = _int(_read(directory, "memory.swap.current"))
    if "memory_extra" in want:
        s.memory_max_usage = _int(_read(directory, "memory.peak"))
        s.memory_failcnt = _keyed(_read(directory, "memory.events")).get("max")
    if "oom" in want:
        s.oom_kills = _keyed(_read(directory, "memory.events")).get("oom_kill")
    if "pids" in want:
        s.pids = _int(_read(directory, "pids.current"))


def sum_samples(samples: list[Sample]) -> Sample:
    """The sum of several cgroups' samples (a pod as the sum of its containers)."""
    total = Sample(timestamp_ns=max((s.timestamp_ns for s in samples), default=time.time_ns()))
    for name in Sample.__dataclass_fields__:
        if name in ("timestamp_ns", "memory_limit"):
            continue
        values = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        if values:
            setattr(total, name, sum(values))
    return total


# -- finding a container's cgroup ---------------------------------------------


def dirs_of_pid(pid: int) -> CgroupDirs | None:
    """The cgroup directories of a live process, from /proc/<pid>/cgroup."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return dirs_from_proc_cgroup(lines)


def dirs_from_proc_cgroup(lines: list[str]) -> CgroupDirs | None:
    if cgroups.is_v2():
        for line in lines:
            if line.startswith("0::"):
                return CgroupDirs(v2=os.path.join(cgroups.CGROUP_ROOT, line[3:].lstrip("/")))
        return None
    mounts = cgroups.v1_mounts()
    found: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(","):
            if controller in ("cpu", "cpuacct", "memory", "pids") and controller in mounts:
                found[controller] = os.path.join(mounts[controller], parts[2].lstrip("/"))
    if not found:
        return None
    return CgroupDirs(**found)


def dirs_of_path(path: str) -> CgroupDirs:
    """The directories of a cgroupfs path (e.g. `/kubepods/pod1/crio-<id>`)."""
    if cgroups.is_v2():
        return CgroupDirs(v2=os.path.join(cgroups.CGROUP_ROOT, path.lstrip("/")))
    mounts = cgroups.v1_mounts()
    rel = path.lstrip("/")
    return CgroupDirs(**{c: os.path.join(mounts[c], rel) for c in ("cpu", "cpuacct", "memory", "pids")
                         if c in mounts})


# -- rates and the cache ----------------------------------------------------------


@dataclass
class _CpuHistory:
    timestamp_ns: int
    usage_ns: int
    nano_cores: int | None = None


@dataclass
class StatsReader:
    """Per-container cgroup locations and CPU history, kept between requests."""

    _dirs: dict[str, CgroupDirs] = field(default_factory=dict)
    _cpu: dict[str, _CpuHistory] = field(default_factory=dict)
    # Held by whoever samples: the caches and CPU histories are not shared between threads.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def locate(self, key: str, pid: int | None, cgroup_path: str | None = None) -> CgroupDirs | None:
        dirs = self._dirs.get(key)
        if dirs is not None:
            return dirs
        if pid:
            dirs = dirs_of_pid(pid)
        if dirs is None and cgroup_path and ":" not in cgroup_path:
            dirs = dirs_of_path(cgroup_path)
        if dirs is not None and dirs.exists():
            self._dirs[key] = dirs
            return dirs
        return None

    def sample(self, key: str, pid: int | None, cgroup_path: str | None = None,
               families: Iterable[str] = ALL_FAMILIES) -> Sample | None:
        dirs = self.locate(key, pid, cgroup_path)
        if dirs is None:
            return None
        sample = read_sample(dirs, families)
        if sample.cpu_usage_ns is None and sample.memory_usage is None and not dirs.exists():
            self.forget(key)  # the cgroup is gone (container deleted)
            return None
        return sample

    def nano_cores(self, key: str, sample: Sample, started_at_ns: int = 0) -> int | None:
        """CPU use in nanocores since the previous sample of `key`.

        With no previous sample, the average since the container started
        stands in (the kubelet's first reading).
        """
        usage = sample.cpu_usage_ns
        if usage is None:
            return None
        previous = self._cpu.get(key)
        if previous is None or usage < previous.usage_ns:
            rate = None
            if started_at_ns and sample.timestamp_ns > started_at_ns:
                rate = usage * 1_000_000_000 // (sample.timestamp_ns - started_at_ns)
            self._cpu[key] = _CpuHistory(sample.timestamp_ns, usage, rate)
            return rate
        elapsed = sample.timestamp_ns - previous.timestamp_ns
        if elapsed < MIN_RATE_INTERVAL_NS:
            return previous.nano_cores
        rate = (usage - previous.usage_ns) * 1_000_000_000 // elapsed
        self._cpu[key] = _CpuHistory(sample.timestamp_ns, usage, rate)
        return rate

    def forget(self, key: str) -> None:
        self._dirs.pop(key, None)
        self._cpu.pop(key, None)

    def keep_only(self, keys: Iterable[str]) -> None:
        keep = set(keys)
        for key in [k for k in self._dirs if k not in keep]:
            del self._dirs[key]
        for key in [k for k in self._cpu if k not in keep]:
            del self._cpu[key]
