"""Facts about live processes, from /proc: whether one still runs, and when it started."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process exists (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return False


def still_running(pid: int, start: int | None) -> bool:
    """Whether the process that had `pid` and started at `start` (ticks; None: any) runs:
    not ended, and its pid not reused by another process since."""
    return pid_alive(pid) and (start is None or process_start_time(pid) == start)


def process_start_time(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot, to tell reused pids apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def start_unix_time(pid: int) -> float | None:
    """When a process started, as a unix time (from its start in ticks and the boot time)."""
    ticks = process_start_time(pid)
    if ticks is None:
        return None
    try:
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")
