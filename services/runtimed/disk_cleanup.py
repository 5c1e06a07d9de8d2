"""Removing what runtimed made on disk: files, mounts, and directory trees that may still hold mounts.

Everything here tolerates absence (a removal is retried after a restart) and
blocks: async callers run the tree removals in a thread.
"""

from __future__ import annotations

import os
import shutil

import structlog

from shared import mountinfo
from shared.mounts import unmount

log = structlog.get_logger(__name__)


def unlink_quiet(path: str) -> None:
    """Remove a file or symlink; a missing one (or a directory) is left alone."""
    try:
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
    except FileNotFoundError:
        pass


def unmount_quiet(path: str) -> None:
    """Unmount `path`, logging (not raising) a failure: teardown goes on."""
    try:
        unmount(path)
    except OSError as e:
        log.warning("unmount_failed", path=path, error=str(e))


def rmtree_unmounting(path: str) -> None:
    """Remove a directory tree, unmounting first whatever is mounted in it (never deleting through a mount)."""
    if not os.path.isdir(path):
        return
    mounted = {m.mount_point for m in mountinfo.current()}
    prefix = os.path.realpath(path)
    for point in sorted((m for m in mounted if m == prefix or m.startswith(prefix + "/")), key=len, reverse=True):
        unmount_quiet(point)
    shutil.rmtree(path, ignore_errors=True)
