"""runtimed: pod sandboxes and containers with runc under conmon, cgroups, logs."""

from __future__ import annotations

from shared.bus.service import Service


class Runtimed(Service):
    name = "runtimed"
    # runc needs whatever the containers it starts may be granted: keep every
    # capability this machine gives us (None), and no more.
    capabilities = None
