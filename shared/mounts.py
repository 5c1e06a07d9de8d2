"""mount(2) and umount2(2) through libc; failures are OSError with the errno.

Only the standard library is imported here, so that small helper programs
running in another namespace may use it too.
"""

from __future__ import annotations

import ctypes
import errno
import os

from shared.libc import libc

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

_libc = libc()
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    ret = _libc.mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype) if fstype else None,
                      flags, os.fsencode(data) if data else None)
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def unmount(target: str, *, detach: bool = True) -> bool:
    """Unmount `target` (lazily when `detach`); False when nothing was mounted there."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH if detach else 0) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # not a mount point, or gone
        return False
    raise OSError(err, f"umount {target}: {os.strerror(err)}")
