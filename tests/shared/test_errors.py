"""Typed errors for a full file system: which file system, and why."""

from __future__ import annotations

import errno
import os

import pytest

from shared.errors import ResourceExhausted, file_system_of, is_no_space, out_of_space
from tests.support.small_fs import tmpfs


def test_no_space_and_quota_are_the_same_to_a_caller():
    assert is_no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_no_space(OSError(errno.EIO, "I/O error"))
    assert not is_no_space(ValueError("no space"))


@pytest.mark.root
def test_the_file_system_named_is_the_one_mounted_deepest_above_the_path(tmp_path):
    with tmpfs(tmp_path / "outer", "1m") as outer, tmpfs(outer / "inner", "1m") as inner:
        # Even for a path not made yet, and through a symbolic link.
        os.symlink(inner, tmp_path / "link")
        assert file_system_of(inner / "not" / "yet") == f"{inner} (tmpfs)"
        assert file_system_of(tmp_path / "link" / "x") == f"{inner} (tmpfs)"
        assert file_system_of(outer / "x") == f"{outer} (tmpfs)"
        error = out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"), inner / "blobs", "writing layer x")
        assert isinstance(error, ResourceExhausted) and error.code == "RESOURCE_EXHAUSTED"
        assert error.message == (f"writing layer x: disk quota exceeded on the file system mounted at {inner} "
                                 f"(tmpfs) (writing in {inner / 'blobs'})")
