"""The common helpers: atomic files, the mount table, mount/umount, programs run with a timeout."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from shared import atomic, mountinfo, mounts, programs
from shared.errors import DeadlineExceeded, Internal


def test_atomic_write_replaces_the_file_with_exactly_the_mode_asked(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    path.write_text("old")
    old_umask = os.umask(0o077)
    try:
        atomic.write_json(path, {"b": 1, "a": [2]}, mode=0o644)
    finally:
        os.umask(old_umask)
    assert path.read_text() == '{"a": [2], "b": 1}'
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert atomic.read_json(path) == {"a": [2], "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    atomic.write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        atomic.write_json(path, {"v": object()})
    assert atomic.read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_mountinfo_parses_escapes_propagation_and_super_options() -> None:
    text = ("36 35 98:0 / /mnt/with\\040space rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue\n"
            "40 25 0:35 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n")
    first, second = mountinfo.parse(text)
    assert first.mount_point == "/mnt/with space"
    assert (first.fstype, first.source, first.super_options) == ("ext3", "/dev/root", "rw,errors=continue")
    assert first.shared and first.slave
    assert not second.shared and not second.slave
    assert second.super_options.split(",") == ["rw", "memory"]


@pytest.mark.root
def test_mount_and_unmount_through_libc(tmp_path: Path) -> None:
    target = tmp_path / "point"
    target.mkdir()
    mounts.mount("criopy-test", str(target), "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "size=1m")
    try:
        assert mountinfo.is_mount_point(str(target))
        assert mountinfo.mount_of(str(target)).fstype == "tmpfs"
    finally:
        assert mounts.unmount(str(target)) is True
    assert not mountinfo.is_mount_point(str(target))
    assert mounts.unmount(str(target)) is False
    with pytest.raises(OSError):
        mounts.mount("none", str(tmp_path / "missing"), "tmpfs")


async def test_program_output_and_status() -> None:
    result = await programs.run(["/bin/sh", "-c", "cat; echo err >&2; exit 3"], timeout=10, input=b"in")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"in", b"err\n")


async def test_program_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    with pytest.raises(DeadlineExceeded):
        await programs.run(["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=0.5)
    child = int(pidfile.read_text())
    for _ in range(100):
        if not os.path.exists(f"/proc/{child}") or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the program's child {child} outlived the timeout")


async def test_program_that_cannot_start_is_internal(tmp_path: Path) -> None:
    with pytest.raises(Internal, match="cannot run"):
        await programs.run([str(tmp_path / "missing")], timeout=5)
