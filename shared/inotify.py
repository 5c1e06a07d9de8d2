"""Names of files written into a directory, as the kernel tells them (inotify), read on the event loop.

A small ctypes binding of inotify_init1/inotify_add_watch: the descriptor is
non-blocking and read by the event loop (`add_reader`), so a watch costs no
thread and no polling. Only what runtimed needs: one directory, the names of
files closed after writing or moved into it, and word when the kernel's queue
overflowed (some names were lost: the caller must look at everything).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from typing import Callable

from shared.libc import libc as c_library

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of NUL-padded name
_READ_SIZE = 64 * 1024

def parse(data: bytes) -> tuple[list[str], bool]:
    """The file names in a buffer of inotify events, and whether the queue overflowed."""
    names: list[str] = []
    overflow = False
    offset = 0
    while offset + _EVENT.size <= len(data):
        _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        offset += _EVENT.size
        raw = data[offset:offset + length]
        offset += length
        if mask & IN_Q_OVERFLOW:
            overflow = True
        name = raw.split(b"\0", 1)[0]
        if name:
            names.append(os.fsdecode(name))
    return names, overflow


class DirectoryWatch:
    """Files written into one directory: `on_names(names)` for each batch, `on_overflow()` when some were lost."""

    def __init__(self, directory: str, on_names: Callable[[list[str]], None],
                 on_overflow: Callable[[], None]) -> None:
        self.directory = directory
        self._on_names = on_names
        self._on_overflow = on_overflow
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch from now on; OSError when the kernel refuses (no inotify, too many watches)."""
        libc = c_library()
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        try:
            wd = libc.inotify_add_watch(fd, os.fsencode(self.directory), IN_CLOSE_WRITE | IN_MOVED_TO)
            if wd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"inotify_add_watch {self.directory}: {os.strerror(err)}")
            loop.add_reader(fd, self._readable)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._loop = fd, loop

    def close(self) -> None:
        if self._fd >= 0:
            assert self._loop is not None
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _readable(self) -> None:
        names: list[str] = []
        overflow = False
        while True:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not data:
                break
            found, lost = parse(data)
            names += found
            overflow = overflow or lost
        if overflow:
            self._on_overflow()
        if names:
            self._on_names(names)
