"""The C library, for the few calls Python's os module lacks (inotify, prctl, mallopt, new system calls)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache


@cache
def libc() -> ctypes.CDLL:
    """glibc, loaded once; its calls set errno (ctypes.get_errno())."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def syscall(number: int, *args: object) -> int:
    """A system call glibc has no wrapper for; its result, or OSError with its errno.

    syscall(2) is variadic: every integer goes as a full register, as the kernel reads it."""
    result = libc().syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result
