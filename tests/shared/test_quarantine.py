"""Damaged state moved aside: the files kept together, the newest entries kept, the oldest dropped."""

from __future__ import annotations

import os
from pathlib import Path

from shared import quarantine


def torn(state: Path, name: str) -> Path:
    path = state / f"{name}.json"
    path.write_text('{"half')
    return path


def test_a_torn_record_is_moved_aside_whole(tmp_path: Path) -> None:
    record = torn(tmp_path, "pod")
    kept = quarantine.set_aside(tmp_path, [record, tmp_path / "missing"], kind="sandbox", name="pod",
                                error="not JSON")
    assert kept is not None and kept.parent == tmp_path / quarantine.DIR
    assert not record.exists() and (kept / "pod.json").read_text() == '{"half'


def test_only_the_newest_entries_are_kept(tmp_path: Path) -> None:
    made = []
    for i in range(quarantine.KEEP + 5):
        made.append(quarantine.set_aside(tmp_path, [torn(tmp_path, f"r{i}")], kind="sandbox", name=f"r{i}",
                                         error="not JSON"))
        assert made[-1] is not None
        # Entries made within one clock tick are still told apart by age.
        os.utime(made[-1], ns=(i * 10**9, i * 10**9))
    left = set((tmp_path / quarantine.DIR).iterdir())
    assert len(left) == quarantine.KEEP
    assert left == set(made[-quarantine.KEEP:])
