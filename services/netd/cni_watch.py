"""Watching the CNI configuration directory.

A change is noticed by comparing a cheap signature of the directory (names,
sizes and modification times of its configuration files, and of the plugin
binaries they name) with the last one seen. `current()` checks it on demand,
so readiness and attach always see the directory as it is now; `run()` polls
in the background so that changes are logged when they happen.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import structlog

from services.netd import cni_config
from services.netd.cni_config import ConfigScan

log = structlog.get_logger(__name__)

Signature = tuple[tuple[str, int, int], ...]


class ConfigWatcher:
    def __init__(self, conf_dir: str | Path, plugin_dirs: list[str], default_network: str = "",
                 poll_interval: float = 1.0) -> None:
        self.conf_dir = Path(conf_dir)
        self.plugin_dirs = list(plugin_dirs)
        self.default_network = default_network
        self.poll_interval = poll_interval
        self._signature: Signature | None = None
        self._scan = ConfigScan(network=None, reason="NetworkPluginNotReady",
                                message="Network plugin returns error: CNI configuration not read yet")

    def _current_signature(self) -> Signature:
        entries: list[tuple[str, int, int]] = []
        try:
            st = os.stat(self.conf_dir)
            entries.append((str(self.conf_dir), st.st_mtime_ns, st.st_ino))
        except OSError:
            return ()
        for path in cni_config.config_files(self.conf_dir):
            try:
                st = os.stat(path)
            except OSError:
                continue
            entries.append((str(path), st.st_mtime_ns, st.st_size))
        # Plugins installed after the configuration (a common order) also count.
        for d in self.plugin_dirs:
            try:
                st = os.stat(d)
                entries.append((d, st.st_mtime_ns, st.st_ino))
            except OSError:
                continue
        return tuple(entries)

    def current(self) -> ConfigScan:
        """The configuration in effect, re-read if the directory changed."""
        signature = self._current_signature()
        if signature != self._signature:
            self._signature = signature
            previous = self._scan.network
            self._scan = cni_config.scan(self.conf_dir, self.plugin_dirs, self.default_network)
            self._log_change(previous)
        return self._scan

    def _log_change(self, previous: cni_config.NetworkList | None) -> None:
        scan = self._scan
        for path, why in scan.skipped.items():
            log.warning("cni_config_skipped", file=path, reason=why)
        if scan.network is None:
            log.warning("cni_network_not_ready", conf_dir=str(self.conf_dir), message=scan.message)
        elif previous is None or previous.raw != scan.network.raw or previous.source != scan.network.source:
            log.info("cni_network_loaded", network=scan.network.name, file=scan.network.source,
                     cni_version=scan.network.cni_version, plugins=scan.network.plugin_types)

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            try:
                self.current()
            except Exception:  # a surprise here must not end the watch
                log.exception("cni_config_watch_failed")
            await asyncio.sleep(self.poll_interval)
