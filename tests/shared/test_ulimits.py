"""`[crio.runtime] default_ulimits` entries, read as CRI-O reads them, and refused at load when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import ulimits
from shared.config_load import load
from shared.errors import ConfigError
from tests.shared.test_config import sources


@pytest.mark.parametrize("entry, expected", [
    ("nofile=1024:2048", ulimits.Ulimit("nofile", 1024, 2048)),
    ("NPROC=500", ulimits.Ulimit("nproc", 500, 500)),
    ("core=-1", ulimits.Ulimit("core", ulimits.UNLIMITED, ulimits.UNLIMITED)),
    ("memlock=64:-1", ulimits.Ulimit("memlock", 64, ulimits.UNLIMITED)),
])
def test_entries(entry: str, expected: ulimits.Ulimit) -> None:
    assert ulimits.parse(entry) == expected


@pytest.mark.parametrize("entry, problem", [
    ("nofiles=1", "with a name among"),
    ("nofile", "with a name among"),
    ("nofile=a:2", "'a' is not a number"),
    ("nofile=10:5", "soft limit is above the hard one"),
    ("nofile=-2", "out of range"),
])
def test_a_wrong_entry_stops_the_load(tmp_path: Path, entry: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(sources(tmp_path, f'[crio.runtime]\ndefault_ulimits = ["{entry}"]\n'), environ={})
    assert "crio.runtime.default_ulimits" in info.value.message and problem in info.value.message
