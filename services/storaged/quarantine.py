"""Records found damaged at start are moved aside, never silently deleted.

    <root>/quarantine/<kind>-<name>-<UTC time>-<random>.json

A torn or garbage record (a power cut, a disk fault) says nothing that can be
trusted, but it is kept for whoever looks into what happened; a log line and
the `criopy_state_records_quarantined_total{kind}` counter say which. Blocks;
the service calls it from threads.
"""

from __future__ import annotations

import os
import secrets
import time

import structlog

from shared import metrics

log = structlog.get_logger(__name__)

DIR = "quarantine"


def set_aside(root: str, path: str, *, kind: str, name: str, error: str) -> str | None:
    """Move the damaged record at `path` into `root`'s quarantine; where it went, None when there was no file."""
    directory = os.path.join(root, DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest: str | None = os.path.join(directory, f"{kind}-{name}-{stamp}-{secrets.token_hex(3)}.json")
    try:
        os.rename(path, dest)  # type: ignore[arg-type]
    except (FileNotFoundError, NotADirectoryError):
        dest = None  # the record is missing altogether
    except OSError as e:
        dest = None
        error = f"{error}; it could not be moved aside: {e.strerror}"
    log.warning("state_record_quarantined", kind=kind, name=name, path=path, moved_to=dest, error=error)
    metrics.STATE_RECORDS_QUARANTINED.labels(kind).inc()
    return dest
