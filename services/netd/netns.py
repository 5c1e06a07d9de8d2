"""Pod network namespaces pinned by bind mounts under one directory.

Creation does what `ip netns add` does, for any directory: the directory
becomes a shared mount point (so unmounting a pin propagates to mount
namespaces copied from this one), then util-linux's `unshare --net=PIN` makes
the namespace, bind-mounts it on the pin file and runs `ip link set lo up`
inside it. The namespace is entered only by that child, never by the daemon;
both are small C programs, a few milliseconds where a Python child took tens.
Removal is an unmount and an unlink, both idempotent.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
from pathlib import Path

import structlog

from services.netd.orphans import OWNER_ENV
from shared import programs
from shared.errors import DeadlineExceeded, Internal, InvalidArgument
from shared.mounts import MS_BIND, MS_REC, MS_SHARED, mount, unmount

log = structlog.get_logger(__name__)

PIN_PREFIX = "criopy-"
UNSHARE = "/usr/bin/unshare"
IP = "/usr/sbin/ip"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _make_shared_dir(directory: str) -> None:
    """Make `directory` a shared mount point, bind-mounting it on itself if needed."""
    try:
        mount("", directory, "none", MS_SHARED | MS_REC)
        return
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: not a mount point yet
            raise
    mount(directory, directory, "none", MS_BIND | MS_REC)
    mount("", directory, "none", MS_SHARED | MS_REC)


def _prepare(path: Path) -> None:
    """The pin's directory as a shared mount point, and the empty pin file to mount on."""
    os.makedirs(path.parent, mode=0o755, exist_ok=True)
    _make_shared_dir(str(path.parent))
    if not is_pinned(path):
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o444)
        os.close(fd)


def pin_path(netns_dir: str | Path, pod_id: str) -> Path:
    """The pin file of a pod; `pod_id` must be a plain name (no path parts)."""
    if not isinstance(pod_id, str) or not _NAME_RE.match(pod_id):
        raise InvalidArgument(
            f"pod id {pod_id!r:.80} is not valid: 1-128 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit")
    return Path(netns_dir) / f"{PIN_PREFIX}{pod_id}"


def is_pinned(path: str | Path) -> bool:
    """True when `path` is a live network namespace pin (an nsfs bind mount)."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


async def create(path: Path, timeout: float, owner: str = "") -> Path:
    """Create and pin a network namespace at `path` with loopback up; idempotent."""
    try:
        await asyncio.to_thread(_prepare, path)
    except OSError as e:
        raise Internal(f"creating network namespace {path}: {e.strerror or e}") from None
    if is_pinned(path):
        return path  # made by an earlier attempt
    try:
        result = await programs.run([UNSHARE, f"--net={path}", IP, "link", "set", "lo", "up"],
                                    timeout=timeout, env={OWNER_ENV: owner} if owner else {})
    except DeadlineExceeded:
        await remove(path)
        raise DeadlineExceeded(f"creating network namespace {path} took more than {timeout:g}s") from None
    if result.returncode != 0:
        reason = result.stderr.decode(errors="replace").strip() or f"exit status {result.returncode}"
        await remove(path)
        raise Internal(f"creating network namespace {path}: {reason}")
    if not is_pinned(path):
        raise Internal(f"creating network namespace {path}: no namespace is mounted there afterwards")
    log.debug("netns_created", path=str(path))
    return path


async def remove(path: Path) -> None:
    """Unmount and unlink a pin; a missing or unmounted pin is not an error."""
    # Pins may be stacked if a create was retried after a crash; unmount all.
    for _ in range(16):
        try:
            if not unmount(str(path)):
                break
        except OSError as e:
            raise Internal(f"unmounting network namespace {path}: {e.strerror}") from None
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise Internal(f"removing network namespace pin {path}: {e.strerror}") from None
    log.debug("netns_removed", path=str(path))


def list_pins(netns_dir: str | Path) -> list[Path]:
    """Pin files of this daemon (by name prefix) in the directory."""
    try:
        names = os.listdir(netns_dir)
    except FileNotFoundError:
        return []
    return sorted(Path(netns_dir) / n for n in names if n.startswith(PIN_PREFIX))
