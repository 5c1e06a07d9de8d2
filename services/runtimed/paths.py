"""Resolving paths from requests and images inside a root, never outside it."""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Callable

from shared.errors import InvalidArgument

_MAX_SYMLINKS = 40


def clean_absolute(path: str, what: str) -> str:
    """A normalised absolute path inside a container; `..` may not climb above /."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"{what} is empty")
    if "\0" in path:
        raise InvalidArgument(f"{what} contains a NUL byte")
    if not path.startswith("/"):
        raise InvalidArgument(f"{what} must be an absolute path: {path!r}")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise InvalidArgument(f"{what} escapes its root: {path!r}")
            parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


def confined_relative(path: str, what: str) -> str:
    """A relative path that stays below its directory (no absolute path, no `..` escape)."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"{what} is empty")
    if "\0" in path:
        raise InvalidArgument(f"{what} contains a NUL byte")
    if path.startswith("/"):
        raise InvalidArgument(f"{what} must be relative: {path!r}")
    depth = 0
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            depth -= 1
            if depth < 0:
                raise InvalidArgument(f"{what} escapes its directory: {path!r}")
        else:
            depth += 1
    if depth == 0:
        raise InvalidArgument(f"{what} names the directory itself: {path!r}")
    return posixpath.normpath(path)


def resolve_in_root(root: str, path: str) -> str:
    """The host path of `path` inside `root`, following symlinks as if `root` were `/`.

    Symlinks that point outside `root` (absolutely or with `..`) stay confined
    to it, the way a chroot would see them. Missing components are allowed.
    """
    root = os.path.realpath(root)
    pending = [p for p in path.split("/") if p not in ("", ".")]
    pending.reverse()
    current: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if current:
                current.pop()
            continue
        candidate = os.path.join(root, *current, part)
        if os.path.islink(candidate):
            links += 1
            if links > _MAX_SYMLINKS:
                raise InvalidArgument(f"too many symlinks resolving {path!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = []
            rest = [p for p in target.split("/") if p not in ("", ".")]
            pending.extend(reversed(rest))
            continue
        current.append(part)
    return os.path.join(root, *current)


def open_for_reading(path: str, is_kind: Callable[[int], bool]) -> int | None:
    """A descriptor reading `path` (opened without following a final link, and without blocking),
    or None when it cannot be opened or `is_kind(st_mode)` (stat.S_ISREG...) refuses it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    if not is_kind(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def read_file_in_root(root: str, path: str, limit: int = 4 * 1024 * 1024) -> str | None:
    """The text of a file of the rootfs, or None if it does not exist there."""
    fd = open_for_reading(resolve_in_root(root, path), stat.S_ISREG)
    if fd is None:
        return None
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit).decode(errors="replace")
    finally:
        os.close(fd)
