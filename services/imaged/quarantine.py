"""Damaged state found at start is moved aside, never silently deleted.

    <imaged state>/quarantine/<UTC time>-<random>-<kind>/<the files as they were found>

A damaged database or record copy says nothing that can be trusted, but it is
kept for whoever looks into what happened; a log line and the
`criopy_state_records_quarantined_total{kind}` counter say which. Blocks.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import structlog

from shared import metrics

log = structlog.get_logger(__name__)


def set_aside(state_dir: Path, files: list[Path], *, kind: str, name: str, error: str) -> Path:
    """Move `files` (those that exist) together into a new directory of the quarantine; returns it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    directory = state_dir / "quarantine" / f"{stamp}-{secrets.token_hex(3)}-{kind}"
    directory.mkdir(parents=True, mode=0o700)
    moved = []
    for path in files:
        try:
            os.rename(path, directory / path.name)
            moved.append(path.name)
        except FileNotFoundError:
            continue
    log.warning("state_record_quarantined", kind=kind, name=name, moved_to=str(directory), files=moved, error=error)
    metrics.STATE_RECORDS_QUARANTINED.labels(kind).inc()
    return directory
