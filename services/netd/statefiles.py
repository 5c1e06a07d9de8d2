"""netd's small JSON state files: written atomically and durably (shared/atomic.py), read as None when absent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shared import atomic


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic.write_json(path, data)


def read_json(path: Path) -> Any:
    """The decoded file, or None if it does not exist. Raises ValueError if corrupt."""
    try:
        return atomic.read_json(path)
    except FileNotFoundError:
        return None


def remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
