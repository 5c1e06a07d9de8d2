"""Pod network namespaces pinned by bind mounts under one directory.

Creation runs `netns_pin.py` as a child process (unshare + bind mount +
loopback up), so the daemon never changes its own namespaces. Removal is an
unmount and an unlink, both idempotent.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import re
import signal
import sys
from pathlib import Path

import structlog

from services.netd.orphans import OWNER_ENV
from shared.errors import DeadlineExceeded, Internal, InvalidArgument

log = structlog.get_logger(__name__)

PIN_PREFIX = "criopy-"
_PIN_PROGRAM = Path(__file__).with_name("netns_pin.py")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


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
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", str(_PIN_PROGRAM), str(path),
        env={OWNER_ENV: owner} if owner else {},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        await remove(path)
        raise DeadlineExceeded(f"creating network namespace {path} took more than {timeout:g}s") from None
    if proc.returncode != 0:
        reason = stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise Internal(f"creating network namespace {path}: {reason}")
    if not is_pinned(path):
        raise Internal(f"creating network namespace {path}: no namespace is mounted there afterwards")
    log.debug("netns_created", path=str(path))
    return path


async def remove(path: Path) -> None:
    """Unmount and unlink a pin; a missing or unmounted pin is not an error."""
    # Pins may be stacked if a create was retried after a crash; unmount all.
    for _ in range(16):
        if _libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):
                break
            raise Internal(f"unmounting network namespace {path}: {os.strerror(err)}")
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


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
