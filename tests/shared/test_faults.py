"""Fault points: off without the test setting; once armed, a point kills its process once."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from shared import faults
from tests.support.stack import REPO

PROGRAM = """
import os, sys
from shared import faults
faults.arm(os.environ)
faults.point("test.first")
print("after first", flush=True)
faults.point("test.second")
print("after second", flush=True)
"""


def run(env: dict[str, str]) -> tuple[int, list[str]]:
    """The program's exit status and the points it went past."""
    result = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=30)
    return result.returncode, [line for line in result.stdout.splitlines() if line.startswith("after")]


def test_points_do_nothing_unless_armed(tmp_path: Path) -> None:
    (tmp_path / "test.first").touch()
    # Without the setting, even an armed file is ignored.
    assert run({}) == (0, ["after first", "after second"])
    assert (tmp_path / "test.first").exists()
    faults.point("test.first")  # this process was never armed


def test_an_armed_point_kills_once(tmp_path: Path) -> None:
    env = {faults.ENV: str(tmp_path)}
    (tmp_path / "test.second").touch()
    assert run(env) == (-signal.SIGKILL, ["after first"])
    assert not (tmp_path / "test.second").exists()
    # Started again, the process goes past the point it died at.
    assert run(env) == (0, ["after first", "after second"])
