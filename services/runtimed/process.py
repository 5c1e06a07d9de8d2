"""Facts about live processes, from /proc: whether one still runs, and when it started."""

from __future__ import annotations


def pid_alive(pid: int) -> bool:
    """Whether a process exists (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return False


def process_start_time(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot, to tell reused pids apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
