"""shared/inotify.py: the names of files written into a directory, read on the event loop."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

from shared.inotify import IN_CLOSE_WRITE, IN_Q_OVERFLOW, DirectoryWatch, parse


def test_parse_reads_names_and_overflow() -> None:
    def event(mask: int, name: bytes) -> bytes:
        padded = name + b"\0" * (16 - len(name)) if name else b""
        return struct.pack("iIII", 1, mask, 0, len(padded)) + padded

    data = event(IN_CLOSE_WRITE, b"abc") + event(IN_Q_OVERFLOW, b"") + event(IN_CLOSE_WRITE, b"x" * 15)
    assert parse(data) == (["abc", "x" * 15], True)
    assert parse(event(IN_CLOSE_WRITE, b"one")) == (["one"], False)


async def test_files_written_or_moved_in_are_told(tmp_path: Path) -> None:
    seen: asyncio.Queue[str] = asyncio.Queue()
    watch = DirectoryWatch(str(tmp_path), lambda names: [seen.put_nowait(n) for n in names], lambda: None)
    watch.start(asyncio.get_running_loop())
    try:
        (tmp_path / "written").write_text("0")
        elsewhere = tmp_path.parent / f"{tmp_path.name}-moved"
        elsewhere.write_text("1")
        os.rename(elsewhere, tmp_path / "moved")
        got = [await asyncio.wait_for(seen.get(), 10) for _ in range(2)]
        assert got == ["written", "moved"]
        # Opening for reading and closing tells nothing.
        (tmp_path / "written").read_text()
        (tmp_path / "third").write_text("2")
        assert await asyncio.wait_for(seen.get(), 10) == "third"
    finally:
        watch.close()
