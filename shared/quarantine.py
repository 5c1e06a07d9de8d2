"""State found damaged at start is moved aside, never silently deleted: one way for every daemon.

    <state dir>/quarantine/<kind>-<name>-<UTC time>-<random>/<the files as they were found>

A torn or garbage record (a power cut, a disk fault) says nothing that can be
trusted, but it is kept for whoever looks into what happened; a
`state_record_quarantined` log line and the
`criopy_state_records_quarantined_total{kind}` counter say which. The service
then starts without it and rebuilds what the machine still shows. A state
directory keeps the KEEP newest entries: a disk that keeps tearing records
does not fill the disk with them. Blocks: async callers run it in a thread, or
at start before serving.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

import structlog

from shared import metrics

log = structlog.get_logger(__name__)

DIR = "quarantine"
KEEP = 64


def set_aside(state_dir: str | os.PathLike[str], files: list[str | os.PathLike[str]], *, kind: str, name: str,
              error: str) -> Path | None:
    """Move `files` (those that exist) together into a new directory of `state_dir`'s quarantine.

    Returns that directory, or None when none of the files was there to move
    (the damage is still logged and counted).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    directory = Path(state_dir) / DIR / f"{kind}-{_plain(name)}-{stamp}-{secrets.token_hex(3)}"
    directory.mkdir(parents=True, mode=0o700)
    moved = []
    for path in map(Path, files):
        try:
            os.rename(path, directory / path.name)
            moved.append(str(path))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            error = f"{error}; {path} could not be moved aside: {e.strerror}"
    if not moved:
        shutil.rmtree(directory, ignore_errors=True)
    log.warning("state_record_quarantined", kind=kind, name=name, paths=[str(p) for p in files],
                moved_to=str(directory) if moved else None, error=error)
    metrics.STATE_RECORDS_QUARANTINED.labels(kind).inc()
    _prune(Path(state_dir) / DIR)
    return directory if moved else None


def _prune(quarantine: Path, keep: int = KEEP) -> None:
    """Delete all but the `keep` newest entries."""
    try:
        entries = sorted(quarantine.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    except OSError:
        return
    for old in entries[:-keep] if len(entries) > keep else []:
        shutil.rmtree(old, ignore_errors=True)
        log.info("quarantine_pruned", path=str(old))


def _plain(name: str) -> str:
    """`name` as one path component."""
    return name.replace("/", "_").replace("\0", "_")[:100] or "unnamed"
