"""The C library, for the few calls Python's os module lacks (inotify, prctl, mallopt)."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def libc() -> ctypes.CDLL:
    """glibc, loaded once; its calls set errno (ctypes.get_errno())."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
