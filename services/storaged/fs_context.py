"""Overlay mounts through the kernel's file system context API (fsopen, fsconfig, fsmount, move_mount).

Each lower directory is its own `lowerdir+` parameter (Linux 6.8 or later),
given as an absolute path: no one-page limit on the options, no working
directory to change, and no child process: a few system calls made in a
thread. Where the kernel lacks the API or the parameter, `supported()` says
so and overlay.py mounts with util-linux's `mount` instead.
"""

from __future__ import annotations

import errno
import os
import platform

from shared.libc import syscall

# x86_64 and aarch64 share these numbers (the generic syscall table has them too).
_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100

_supported: bool | None = None


class MountFailed(OSError):
    """The kernel refused the mount; the message is the file system's own, from the context's log."""


def _kernel_log(fd: int) -> str:
    """What the file system wrote to the context's log ("e overlayfs: ..." lines)."""
    lines = []
    while True:
        try:
            message = os.read(fd, 4096)
        except OSError:
            break
        if not message:
            break
        lines.append(message.decode(errors="replace").partition(" ")[2] or message.decode(errors="replace"))
    return "; ".join(lines)


def _set(fd: int, key: str, value: str) -> None:
    try:
        syscall(_SYS_FSCONFIG, fd, _FSCONFIG_SET_STRING, key.encode(), value.encode(), 0)
    except OSError as e:
        raise MountFailed(e.errno, f"{key}={value}: {_kernel_log(fd) or e.strerror}") from None


def supported() -> bool:
    """Whether this kernel takes overlay lower directories one by one (probed once)."""
    global _supported
    if _supported is None:
        _supported = platform.machine() in ("x86_64", "aarch64") and _probe()
    return _supported


def _probe() -> bool:
    try:
        fd = syscall(_SYS_FSOPEN, b"overlay", _FSOPEN_CLOEXEC)
    except OSError:
        return False
    try:
        syscall(_SYS_FSCONFIG, fd, _FSCONFIG_SET_STRING, b"lowerdir+", b"/", 0)
        return True
    except OSError as e:
        return e.errno not in (errno.EINVAL, errno.EOPNOTSUPP)
    finally:
        os.close(fd)


def mount_overlay(target: str, lowers: list[str], upper: str, work: str, options: dict[str, str]) -> None:
    """Mount an overlay on `target`: `lowers` top first, every path absolute. Blocking: call in a thread."""
    fd = syscall(_SYS_FSOPEN, b"overlay", _FSOPEN_CLOEXEC)
    try:
        _set(fd, "source", "overlay")  # as `mount -t overlay overlay` names it
        for lower in lowers:
            _set(fd, "lowerdir+", lower)
        _set(fd, "upperdir", upper)
        _set(fd, "workdir", work)
        for key, value in options.items():
            _set(fd, key, value)
        try:
            syscall(_SYS_FSCONFIG, fd, _FSCONFIG_CMD_CREATE, None, None, 0)
        except OSError as e:
            raise MountFailed(e.errno, _kernel_log(fd) or e.strerror) from None
        mount_fd = syscall(_SYS_FSMOUNT, fd, _FSMOUNT_CLOEXEC, 0)
        try:
            syscall(_SYS_MOVE_MOUNT, mount_fd, b"", _AT_FDCWD, target.encode(), _MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(mount_fd)
    finally:
        os.close(fd)
