"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.support.stack import Dirs, Stack, remove_dirs, short_tempdir, start_stack

BRIDGE_CONFLIST = """{
  "cniVersion": "1.0.0",
  "name": "criopy-test",
  "plugins": [{"type": "loopback"}]
}
"""


@pytest.fixture
def dirs() -> Iterator[Dirs]:
    d = Dirs(short_tempdir()).make()
    try:
        yield d
    finally:
        remove_dirs(d)


@pytest.fixture
def stack(dirs: Dirs) -> Iterator[Stack]:
    """All five services under `criopy run`, with a CNI configuration in place."""
    (dirs.cni / "10-test.conflist").write_text(BRIDGE_CONFLIST)
    s = start_stack(dirs)
    try:
        yield s
    finally:
        s.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)
