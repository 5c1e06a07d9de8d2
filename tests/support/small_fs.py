"""Small file systems for tests of a full disk: a tmpfs mounted for the test, unmounted whatever happens.

    with tmpfs(path, "8m"):
        ...                      # writes beyond 8 MiB fail with ENOSPC
        resize(path, "64m")      # room again, files kept
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "criopy-test-tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        # Lazily: a process of a failed test may still hold a file open there.
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


def fill(path: Path) -> Path:
    """A file in `path` that takes all of its file system's free space."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler
