"""The filesystem side of crio-py's unix sockets: their directories, owners and modes, stale files.

Each daemon's sockets (bus, events, streams) sit in a directory of its own,
`<bus dir>/<service>/`, owned by the daemon's user and group, mode 2750: only
the daemon and members of its group (the frontend) may enter it, and what is
made inside takes the directory's group (the setgid bit), so a socket file,
0660, is the daemon's group's too. The supervisor's is root's alone (0700).

ZeroMQ and gRPC both unlink whatever file is at a path before they bind it.
`claim` stands before them: a file left by a predecessor that died is
removed, but a socket someone still serves is never taken over.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from shared.errors import FailedPrecondition

SOCKET_MODE = 0o660
DAEMON_DIR_MODE = 0o2750
PRIVATE_DIR_MODE = 0o700


class SocketInUse(FailedPrecondition):
    """Another process serves the socket at this path."""


def path_of(endpoint: str) -> str | None:
    return endpoint.removeprefix("ipc://") if endpoint.startswith("ipc://") else None


def ensure_dir(path: Path, *, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Make `path` (parents as root's 0755) and give it `mode`, and `owner` (uid, gid) when given."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise FailedPrecondition(f"{path} is not a directory")
    if owner is not None and (info.st_uid, info.st_gid) != owner:
        os.chown(path, *owner, follow_symlinks=False)
    if stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)


def is_served(path: str | os.PathLike[str]) -> bool:
    """Whether a process accepts connections on the unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                return False
            raise
    return True


def claim(path: str | os.PathLike[str]) -> None:
    """Before a bind at `path`: remove a stale socket file; SocketInUse when a live one is there."""
    if not os.path.lexists(path):
        return
    if is_served(path):
        raise SocketInUse(f"{os.fspath(path)} is served by another process; not taking it over")
    os.unlink(path)


def prepare(endpoint: str) -> None:
    """Before a bind: the socket's directory exists (0750 when made here), no stale file is left."""
    path = path_of(endpoint)
    if path is None:
        return
    os.makedirs(os.path.dirname(path), mode=DAEMON_DIR_MODE, exist_ok=True)
    claim(path)


def restrict(path: str | os.PathLike[str]) -> None:
    """After a bind: only the owner and its group may connect."""
    os.chmod(path, SOCKET_MODE)
