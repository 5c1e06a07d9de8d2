"""Cgroups with the cgroupfs driver: v1 (one hierarchy per controller) or the v2 unified tree.

Pod cgroups are directories under `cgroup_parent`; runc makes each container's
own cgroup below them and removes it on `runc delete`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time

import structlog

from shared import mountinfo
from shared.errors import InvalidArgument

log = structlog.get_logger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
# Controllers a pod cgroup is made in on v1 (runc joins the others at their root).
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer", "blkio", "hugetlb")


def is_v2() -> bool:
    return os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers"))


_v1_mounts: dict[str, str] | None = None


def v1_mounts() -> dict[str, str]:
    """Mount point of each v1 controller (do not change it), read once: a pod's cgroups are looked up
    several times as it is made and removed, and the mount table grows with every pod (its namespace
    pins, /dev/shm, root file systems), so reading it each time would cost more with each pod."""
    global _v1_mounts
    if _v1_mounts is None:
        _v1_mounts = _read_v1_mounts()
    return _v1_mounts


def refresh_mounts() -> None:
    """Read the cgroup hierarchies again at the next lookup (they are examined again: start, reload)."""
    global _v1_mounts
    _v1_mounts = None


def _read_v1_mounts() -> dict[str, str]:
    mounts: dict[str, str] = {}
    try:
        table = mountinfo.current()
    except OSError:
        return mounts
    for mount in table:
        if mount.fstype == "cgroup2":
            # Hybrid mode: runc makes container cgroups in the unified tree as well.
            mounts.setdefault("unified", mount.mount_point)
        elif mount.fstype == "cgroup":
            for opt in mount.super_options.split(","):
                if opt in V1_CONTROLLERS or opt.startswith("name="):
                    mounts.setdefault(opt, mount.mount_point)
    return mounts


def _kernel_controllers() -> set[str]:
    """Controllers the kernel was built with and has enabled (/proc/cgroups)."""
    try:
        with open("/proc/cgroups") as f:
            rows = [line.split() for line in f if not line.startswith("#")]
    except OSError:
        return set()
    return {row[0] for row in rows if len(row) >= 4 and row[3] == "1"}


def hugetlb_usable() -> tuple[bool, str]:
    """Whether runc can set hugepage limits on this machine, and a sentence saying why (not).

    A kernel may know the hugetlb controller while no hierarchy the runtime uses
    has it (cgroup v1 with hugetlb left unmounted, or bound to the v2 tree of a
    hybrid setup that runc's v1 driver does not use for it); then every limit
    runc is given fails the container's creation.
    """
    if is_v2():
        try:
            with open(os.path.join(CGROUP_ROOT, "cgroup.controllers")) as f:
                offered = f.read().split()
        except OSError as e:
            return False, f"cannot read the cgroup v2 root's controllers: {e.strerror}"
        if "hugetlb" in offered:
            return True, "the cgroup v2 root offers the hugetlb controller"
        return False, "the cgroup v2 root does not offer the hugetlb controller"
    if "hugetlb" in v1_mounts():
        return True, "the hugetlb controller is mounted in a cgroup v1 hierarchy"
    if "hugetlb" not in _kernel_controllers():
        return False, "the kernel has no hugetlb cgroup controller"
    return False, "the kernel has the hugetlb controller but no cgroup v1 hierarchy mounts it"


def check_parent(parent: str) -> str:
    """A cgroup parent path for the cgroupfs driver: absolute, no `..`."""
    if not parent:
        raise InvalidArgument("cgroup parent is empty")
    if not parent.startswith("/"):
        parent = "/" + parent
    if any(p == ".." for p in parent.split("/")):
        raise InvalidArgument(f"cgroup parent escapes the cgroup tree: {parent!r}")
    return os.path.normpath(parent)


def controller_dirs(path: str) -> list[str]:
    """The host directories of cgroup `path` (one per v1 controller, or one on v2)."""
    rel = path.lstrip("/")
    if is_v2():
        return [os.path.join(CGROUP_ROOT, rel)]
    return [os.path.join(mount, rel) for mount in sorted(set(v1_mounts().values()))]


def controller_dir(path: str, controller: str) -> str | None:
    rel = path.lstrip("/")
    if is_v2():
        return os.path.join(CGROUP_ROOT, rel)
    mount = v1_mounts().get(controller)
    return os.path.join(mount, rel) if mount else None


def missing(path: str) -> list[str]:
    """The directories `create(path)` would make: recorded first, so a crash cannot leak them."""
    out: list[str] = []
    mounts = [CGROUP_ROOT] if is_v2() else sorted(set(v1_mounts().values()))
    for mount in mounts:
        current = mount
        for part in [p for p in path.split("/") if p]:
            current = os.path.join(current, part)
            if not os.path.isdir(current):
                out.append(current)
    return out


def create(path: str) -> list[str]:
    """Make cgroup `path` in every hierarchy; return the directories this call made (top first)."""
    made: list[str] = []
    if is_v2():
        _create_chain(CGROUP_ROOT, path, made, v2=True)
    else:
        # Every hierarchy, named ones too: runc makes the container's cgroup in all of them.
        for controller, mount in v1_mounts().items():
            _create_chain(mount, path, made, cpuset=controller == "cpuset")
    return made


def _create_chain(mount: str, path: str, made: list[str], *, cpuset: bool = False, v2: bool = False) -> None:
    current = mount
    for part in [p for p in path.split("/") if p]:
        parent = current
        current = os.path.join(current, part)
        if v2:
            _enable_subtree(parent)
        try:
            os.mkdir(current, 0o755)
        except FileExistsError:
            continue
        made.append(current)
        if cpuset:
            # A v1 cpuset cgroup starts empty; copy the parent's so tasks can join it.
            for name in ("cpuset.cpus", "cpuset.mems"):
                try:
                    with open(os.path.join(parent, name)) as src:
                        value = src.read().strip()
                    with open(os.path.join(current, name), "w") as dst:
                        dst.write(value)
                except OSError:
                    pass


def _enable_subtree(directory: str) -> None:
    try:
        with open(os.path.join(directory, "cgroup.controllers")) as f:
            controllers = f.read().split()
        with open(os.path.join(directory, "cgroup.subtree_control"), "w") as f:
            f.write(" ".join("+" + c for c in controllers))
    except OSError:
        pass


async def remove_dirs(dirs: list[str], *, timeout: float = 2.0) -> list[str]:
    """Remove cgroup directories (deepest first); return those still in use.

    A directory whose last tasks are still leaving is tried again until
    `timeout`, waiting on the event loop (never in a thread: a pod slow to empty
    would hold one of the few the whole daemon shares). A directory with child
    cgroups is in use by someone else and is left alone.
    """
    left: list[str] = []
    for directory in sorted(dirs, key=lambda d: d.count("/"), reverse=True):
        deadline = time.monotonic() + timeout
        while (removed := _rmdir(directory)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not removed:
            log.info("cgroup_left_in_use", path=directory)
            left.append(directory)
    return left


def _rmdir(directory: str) -> bool | None:
    """One try: True when it is gone, None when it may empty soon, False when it is in use for good."""
    try:
        os.rmdir(directory)
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        return None if e.errno == errno.EBUSY and not _has_children(directory) else False


def _has_children(directory: str) -> bool:
    try:
        return any(entry.is_dir(follow_symlinks=False) for entry in os.scandir(directory))
    except OSError:
        return False


def tree_dirs(path: str) -> list[str]:
    """Cgroup `path` and every cgroup below it, in every hierarchy (for remove_dirs)."""
    dirs: list[str] = []
    for top in controller_dirs(path):
        for root, subdirs, _files in os.walk(top):
            for d in subdirs:
                dirs.append(os.path.join(root, d))
        if os.path.isdir(top):
            dirs.append(top)
    return dirs


def procs(path: str) -> list[str]:
    """The cgroup.procs files of cgroup `path`, one per hierarchy."""
    return [os.path.join(d, "cgroup.procs") for d in controller_dirs(path)]


def read_value(path: str, controller: str, name: str) -> str | None:
    directory = controller_dir(path, controller)
    if directory is None:
        return None
    try:
        with open(os.path.join(directory, name)) as f:
            return f.read().strip()
    except OSError:
        return None


def systemd_path(parent: str, prefix: str, name: str) -> str:
    """runc's `slice:prefix:name` form for the systemd driver."""
    if parent and not parent.endswith(".slice"):
        raise InvalidArgument(f"cgroup parent for the systemd driver must be a .slice: {parent!r}")
    return f"{parent or 'system.slice'}:{prefix}:{name}"
