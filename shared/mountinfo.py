"""The mount table of this mount namespace, from /proc/self/mountinfo."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str
    # The file system's own options (for cgroup v1: its controllers).
    super_options: str
    # Optional fields: propagation (`shared:N`, `master:N`...).
    optional: tuple[str, ...] = ()
    # The device's "major:minor", as st_dev gives it (os.major, os.minor).
    device: str = ""

    @property
    def shared(self) -> bool:
        return any(o.startswith("shared:") for o in self.optional)

    @property
    def slave(self) -> bool:
        return any(o.startswith("master:") for o in self.optional)


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[Mount]:
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 3 or sep < 6:
            continue
        mounts.append(Mount(
            mount_point=_unescape(fields[4]),
            fstype=fields[sep + 1],
            source=_unescape(fields[sep + 2]),
            super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
            optional=tuple(fields[6:sep]),
            device=fields[2],
        ))
    return mounts


def current() -> list[Mount]:
    """Every mount, in the kernel's order (a later mount on the same point hides an earlier one)."""
    # Mount points are bytes to the kernel: one that is not UTF-8 must not break the table.
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read())


def mount_points_under(root: str) -> list[str]:
    """Mount points strictly below `root` (a real path), deepest first."""
    prefix = root.rstrip("/") + "/"
    found = {m.mount_point for m in current() if m.mount_point.startswith(prefix)}
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def mount_of(path: str) -> Mount | None:
    """The mount `path` lives on (the longest matching mount point, last mounted wins)."""
    path = os.path.realpath(path)
    best: Mount | None = None
    for mount in current():
        point = mount.mount_point
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best.mount_point):
                best = mount
    return best


def is_mount_point(path: str) -> bool:
    path = os.path.realpath(path)
    return any(m.mount_point == path for m in current())


def overlay_lowers(root: str) -> dict[str, list[str]]:
    """{mount point: its lower dirs as mounted, top first} for the overlays mounted below `root`.

    The lower dirs are the paths given at mount time, relative to `root` when
    they were given under it (for storaged's layer store: `l/<short name>`,
    or `empty`): all in one `lowerdir=` option, or one `lowerdir+=` each.
    """
    prefix = root.rstrip("/") + "/"
    found: dict[str, list[str]] = {}
    for m in current():
        if m.fstype != "overlay" or not m.mount_point.startswith(prefix):
            continue
        lowers: list[str] = []
        for option in m.super_options.split(","):
            if option.startswith("lowerdir="):
                lowers = [_unescape(p) for p in option[len("lowerdir="):].split(":") if p]
            elif option.startswith("lowerdir+="):
                lowers.append(_unescape(option[len("lowerdir+="):]))
        found[m.mount_point] = [p.removeprefix(prefix) for p in lowers]
    return found
