"""Overlay mounts of container root filesystems.

Where the kernel takes overlay lower directories one by one (Linux 6.8 and
later), the mount is a few system calls in a thread (fs_context.py). Elsewhere
it runs util-linux's `mount` in the layer store's directory, so that the
lower directories can be given as short relative paths (`l/<short name>`)
and an image with hundreds of layers still fits the kernel's one-page limit on
mount options (changing directory is process-wide: never in the daemon
itself). Unmounting needs no working directory and is a plain umount2(2) in a
thread.
"""

from __future__ import annotations

import asyncio
import os
import resource

import structlog

from services.storaged import fs_context
from shared import mounts, programs
from shared.errors import DeadlineExceeded, Internal, ResourceExhausted

log = structlog.get_logger(__name__)

MOUNT = "/usr/bin/mount"

# The kernel copies at most one page of mount data, including the final NUL.
MAX_OPTIONS_BYTES = resource.getpagesize() - 1


# Beside the directories: no inode index (it would tie an upper dir to its lowers' file handles).
OPTIONS = {"index": "off"}


def options(lowers: list[str], upper: str, work: str) -> str:
    """Mount data for an overlay; `lowers` top first, paths relative to the store."""
    extra = ",".join(f"{key}={value}" for key, value in OPTIONS.items())
    return f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},{extra}"


async def mount_stack(root: str, target: str, lowers: list[str], upper: str, work: str) -> None:
    """Mount an overlay on `target`; `lowers` top first, every path relative to the store's `root`."""
    if fs_context.supported():
        try:
            await asyncio.to_thread(fs_context.mount_overlay, target, [os.path.join(root, p) for p in lowers],
                                    os.path.join(root, upper), os.path.join(root, work), OPTIONS)
        except OSError as e:
            raise Internal(f"mounting the overlay on {target} failed: {e.strerror}") from None
        log.debug("overlay_mounted", target=target, lowers=len(lowers))
        return
    await mount(root, target, options(lowers, upper, work))


async def mount(cwd: str, target: str, data: str, *, timeout: float = 30.0) -> None:
    """Mount an overlay on `target` with `data` whose relative paths start at `cwd`."""
    if len(data.encode()) > MAX_OPTIONS_BYTES:
        raise ResourceExhausted(
            f"overlay mount options for {target} are {len(data.encode())} bytes, more than the "
            f"kernel's limit of {MAX_OPTIONS_BYTES}: the image has too many layers")
    try:
        result = await programs.run(
            [MOUNT, "--no-mtab", "--internal-only", "-t", "overlay", "-o", data, "overlay", target],
            timeout=timeout, cwd=cwd)
    except DeadlineExceeded:
        raise DeadlineExceeded(f"mounting the overlay on {target} took more than {timeout:g}s") from None
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise Internal(f"mounting the overlay on {target} failed: {message}")
    log.debug("overlay_mounted", target=target, options_bytes=len(data))


def unmount_blocking(target: str) -> bool:
    """Detach the mount at `target`; False when nothing was mounted there."""
    try:
        return mounts.unmount(target)
    except OSError as e:
        raise Internal(f"unmounting {target} failed: {e.strerror}") from None


async def unmount(target: str) -> bool:
    return await asyncio.to_thread(unmount_blocking, target)
