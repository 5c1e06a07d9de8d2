"""Fault points for tests: named places where a service kills itself, as a power cut or the OOM killer would.

    faults.point("netd.attach.after_cni_add")

Off unless the process was started with CRIOPY_FAULT_DIR naming a directory,
which only tests set (`make run`, `criopy run` and the systemd units never
do): then `point` is a no-op that costs one comparison. When it is set, a
point fires when a file of its name exists in that directory: the file is
removed first, so the restarted service does not die there again, then the
process sends itself SIGKILL, leaving whatever it was doing half done.
"""

from __future__ import annotations

import os
import signal
from typing import Mapping

import structlog

log = structlog.get_logger(__name__)

ENV = "CRIOPY_FAULT_DIR"

_directory: str | None = None


def arm(environ: Mapping[str, str]) -> None:
    """Read the fault directory from the process's environment, once, at start."""
    global _directory
    _directory = environ.get(ENV) or None
    if _directory is not None:
        log.warning("fault_points_armed", directory=_directory)


def point(name: str) -> None:
    """Die here with SIGKILL if a test armed this point (see the module's description)."""
    if _directory is None:
        return
    try:
        os.unlink(os.path.join(_directory, name))
    except FileNotFoundError:
        return
    log.warning("fault_point_reached", point=name)
    os.kill(os.getpid(), signal.SIGKILL)
