"""One running instance per service: a lock file that holds the running process's pid.

`criopy run` and each `criopy service NAME` take their lock (config.lock_file)
before they touch a socket, and hold it until they exit (the kernel releases
it, however the process ends). A second instance finds it taken and refuses
to start, naming the pid that holds it, instead of taking over the first
one's sockets.

The lock is an open file description lock (F_OFD_SETLK): like flock, it
belongs to the open file and survives the process changing user; unlike
flock, another process can test it (F_OFD_GETLK) without taking it even for
an instant, so `criopy status` and the supervisor's checks never make a
starting service find its lock taken.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from shared.errors import FailedPrecondition


class AlreadyRunning(FailedPrecondition):
    """Another instance holds the lock."""


def _pid_in(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return "unknown"
    return text or "unknown"


# struct flock: l_type, l_whence, l_start, l_len, l_pid (and padding), the whole file.
_FLOCK = struct.Struct("hhqqi4x")


def _lock(fd: int, command: int, kind: int) -> int:
    """The lock type found (F_OFD_GETLK) or set; OSError EAGAIN when another holds it."""
    answer = fcntl.fcntl(fd, command, _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
    return _FLOCK.unpack(answer)[0]


def acquire(path: Path, what: str, *, owner: tuple[int, int] | None = None) -> int:
    """Lock `path` for this process (its pid written inside); the open descriptor, kept for the process's life.

    `owner` (uid, gid) is given to a lock file this call creates, so that a service that starts
    as its own user next time can open it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        pid = _pid_in(fd)
        os.close(fd)
        raise AlreadyRunning(f"{what} is already running (pid {pid}, holding {path})") from None
    if owner is not None and os.fstat(fd).st_uid != owner[0]:
        os.fchown(fd, *owner)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def holder(path: Path) -> int | None:
    """The pid of the process that holds `path` locked; None when nobody does (or it cannot be read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if _lock(fd, fcntl.F_OFD_GETLK, fcntl.F_RDLCK) == fcntl.F_UNLCK:
            return None
        text = _pid_in(fd)
        return int(text) if text.isdigit() else None
    finally:
        os.close(fd)
