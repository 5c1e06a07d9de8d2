"""Files replaced atomically: a reader, or a restart after a crash, sees the old content or the new, never a part."""

from __future__ import annotations

import json
import os
import secrets
from typing import Any


def _fsync_path(path: str | os.PathLike[str], flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or an unlink in `path` survive a crash."""
    _fsync_path(path, os.O_DIRECTORY)


def sync(path: str | os.PathLike[str]) -> None:
    """Make a file written without `durable` (see write_bytes), and its name, survive a crash."""
    _fsync_path(path)
    fsync_dir(os.path.dirname(os.fspath(path)) or ".")


def write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace `path` with `data` through a temporary file in the same directory and a rename.

    `durable`: the data and the rename are on disk when this returns (fsync of
    the file and of its directory); without it only atomicity is promised.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    # A name of its own per writer: two writers never share a temporary file. It ends
    # in ".tmp" so that loaders can recognise and delete what a crash left.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(directory)


def write_json(path: str | os.PathLike[str], data: Any, *, mode: int = 0o644, sort_keys: bool = True) -> None:
    """Replace `path` with `data` as JSON, durably (see write_bytes)."""
    write_bytes(path, json.dumps(data, sort_keys=sort_keys).encode(), mode=mode)


def read_json(path: str | os.PathLike[str]) -> Any:
    """The decoded file; OSError when it cannot be read, ValueError when it is not JSON."""
    with open(path, "rb") as f:
        return json.loads(f.read())
