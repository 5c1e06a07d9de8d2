"""Host mount table facts: the mount a path lives on and its propagation; mount/umount calls."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MNT_DETACH = 0x2


@dataclass
class MountInfo:
    mount_point: str
    optional: list[str]
    fstype: str

    @property
    def shared(self) -> bool:
        return any(o.startswith("shared:") for o in self.optional)

    @property
    def slave(self) -> bool:
        return any(o.startswith("master:") for o in self.optional)


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_table() -> list[MountInfo]:
    table = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = pre.split()
            if len(fields) < 6:
                continue
            table.append(MountInfo(_unescape(fields[4]), fields[6:], post.split()[0] if post else ""))
    return table


def mount_of(path: str) -> MountInfo | None:
    """The mount `path` lives on (the longest matching mount point, last mounted wins)."""
    path = os.path.realpath(path)
    best: MountInfo | None = None
    for info in mount_table():
        mp = info.mount_point
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) >= len(best.mount_point):
                best = info
    return best


def is_mount_point(path: str) -> bool:
    path = os.path.realpath(path)
    return any(info.mount_point == path for info in mount_table())


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    ret = _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                      ctypes.c_ulong(flags), data.encode() if data else None)
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def unmount(target: str, *, detach: bool = True) -> None:
    """Unmount `target`; not mounted is fine."""
    ret = _libc.umount2(target.encode(), MNT_DETACH if detach else 0)
    if ret != 0:
        err = ctypes.get_errno()
        if err in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            return
        raise OSError(err, f"umount {target}: {os.strerror(err)}")
