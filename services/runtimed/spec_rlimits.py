"""The spec's process.rlimits: `[crio.runtime] default_ulimits`, within what runc may set here.

runc sets them with setrlimit inside the container, with runtimed's
capabilities: without CAP_SYS_RESOURCE the kernel refuses a hard limit above
the one runc inherited (runtimed's own), and every creation would fail. As
containerd's restrict_oom_score_adj does for the OOM score, such a limit is
lowered to runtimed's own, and said once in the log.
"""

from __future__ import annotations

import resource
from typing import Any

import structlog

from services.runtimed.spec_security import runtime_capabilities
from shared import ulimits

log = structlog.get_logger(__name__)

_told: set[tuple[str, int]] = set()


def process_rlimits(entries: list[str], available: frozenset[str] | None = None) -> list[dict[str, Any]]:
    caps = available if available is not None else runtime_capabilities()
    out = []
    for entry in entries:
        limit = ulimits.parse(entry)  # checked when the configuration loaded
        soft, hard = limit.soft, limit.hard
        own = _own_hard_limit(limit.rlimit)
        if "CAP_SYS_RESOURCE" not in caps and own is not None and hard > own:
            if (entry, own) not in _told:
                _told.add((entry, own))
                log.warning("default_ulimit_lowered", ulimit=entry, hard_limit=own,
                            reason="runtimed lacks CAP_SYS_RESOURCE to raise a hard limit above its own")
            hard, soft = own, min(soft, own)
        out.append({"type": limit.rlimit, "soft": soft, "hard": hard})
    return out


def _own_hard_limit(rlimit: str) -> int | None:
    number = getattr(resource, rlimit, None)
    if number is None:
        return None  # RLIMIT_LOCKS: not in Python's resource module, and ignored by Linux since 2.4
    hard = resource.getrlimit(number)[1]
    return ulimits.UNLIMITED if hard == resource.RLIM_INFINITY else hard
