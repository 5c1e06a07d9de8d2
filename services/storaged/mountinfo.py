"""The mount points of this mount namespace, from /proc/self/mountinfo."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str
    options: str


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
            options=fields[sep + 3] if len(fields) > sep + 3 else "",
        ))
    return mounts


def current() -> list[Mount]:
    with open("/proc/self/mountinfo") as f:
        return parse(f.read())


def mount_points_under(root: str) -> list[str]:
    """Mount points strictly below `root` (a real path), deepest first."""
    prefix = root.rstrip("/") + "/"
    found = {m.mount_point for m in current() if m.mount_point.startswith(prefix)}
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def overlay_lowers(root: str) -> dict[str, list[str]]:
    """{mount point: its lower dirs as mounted, top first} for the overlays mounted below `root`.

    The lower dirs are the paths given at mount time (for the layer store:
    `l/<short name>` relative to the store, or `empty`).
    """
    prefix = root.rstrip("/") + "/"
    found: dict[str, list[str]] = {}
    for m in current():
        if m.fstype != "overlay" or not m.mount_point.startswith(prefix):
            continue
        for option in m.options.split(","):
            if option.startswith("lowerdir="):
                found[m.mount_point] = [_unescape(p) for p in option[len("lowerdir="):].split(":") if p]
    return found
