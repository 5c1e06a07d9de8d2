"""Disk usage of a directory tree: bytes allocated and inodes, each inode counted once."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    used_bytes: int
    inodes: int


def measure(path: str) -> Usage:
    """Walk `path` without following symlinks or crossing into other file systems."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return Usage(0, 0)
    seen: set[int] = {top.st_ino}
    used = top.st_blocks * 512
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            it = os.scandir(current)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_dev != top.st_dev:
                    continue
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
                used += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return Usage(used, len(seen))


def measure_all(paths: list[str]) -> Usage:
    """The sum of several trees' usage (each measured apart: an inode shared by two counts twice)."""
    used = inodes = 0
    for path in paths:
        usage = measure(path)
        used, inodes = used + usage.used_bytes, inodes + usage.inodes
    return Usage(used, inodes)
