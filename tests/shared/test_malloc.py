"""shared/malloc.py: glibc takes the cap on its arenas."""

from __future__ import annotations

import subprocess
import sys

from tests.support.stack import REPO


def test_glibc_accepts_the_arena_cap() -> None:
    # In a process of its own: the cap stays with the process that sets it.
    result = subprocess.run([sys.executable, "-c", "from shared import malloc; print(malloc.limit_arenas())"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "True", result.stderr
