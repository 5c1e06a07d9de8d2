"""storaged: unpacked layers, container root filesystems on overlayfs, disk usage."""

from __future__ import annotations

from shared.bus.service import Service


class Storaged(Service):
    name = "storaged"
    # Mounting overlays and recreating the files of layers with their owners,
    # modes, setuid bits, file capabilities and (when allowed) device nodes.
    capabilities = frozenset({
        "CAP_SYS_ADMIN", "CAP_CHOWN", "CAP_FOWNER", "CAP_FSETID",
        "CAP_DAC_OVERRIDE", "CAP_MKNOD", "CAP_SETFCAP",
    })
