"""Resource limits the services start with under `criopy run`, as CRI-O's unit gives it.

Containers inherit their open-files limit from conmon, and conmon from
runtimed; the frontend and netd hold a connection per stream. CRI-O's unit
sets LimitNOFILE=1048576 and so do crio-py's units (deploy/systemd);
`criopy run` raises its own limit before it starts the services: the soft
limit to the hard one, and the hard one to OPEN_FILES where the process may
(raising a hard limit takes CAP_SYS_RESOURCE, which a machine may withhold).
"""

from __future__ import annotations

import resource

OPEN_FILES = 1048576


def raise_open_files(wanted: int = OPEN_FILES) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE as far as allowed, towards `wanted`; the limits now in force (soft, hard).

    Called before logging is set up (what the services inherit must be in place before the fork
    server starts): the caller logs the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), wanted))
            return resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ValueError, OSError):
            pass  # kept: the soft limit meets it below
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
