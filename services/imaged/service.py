"""imaged: registry pulls, the content-addressed blob store and image records."""

from __future__ import annotations

from shared.bus.service import Service


class Imaged(Service):
    name = "imaged"
    # Talks to registries and writes only its own store: no capability at all.
    capabilities = frozenset()
