"""What every part of runtimed works with: settings, directories, records, events, runtime handlers."""

from __future__ import annotations

import os

from services.runtimed.cgroup_stats import StatsReader
from services.runtimed.events import Events
from services.runtimed.exit_notices import ExitNotices
from services.runtimed.features import Features
from services.runtimed.records import Records
from services.runtimed.runc import Runc
from shared.config import Config, RuntimeHandler
from shared.errors import InvalidArgument


class Context:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.rc = config.crio.runtime
        self.state_dir = str(config.state_dir("runtimed"))
        self.run_dir = str(config.run_dir("runtimed"))
        self.exit_dir = self.rc.container_exits_dir or os.path.join(self.run_dir, "exits")
        self.attach_dir = os.path.join(self.run_dir, "attach")
        self.systemd = self.rc.cgroup_manager == "systemd"
        self.records = Records(self.state_dir)
        self.events = Events()
        self.exit_notices = ExitNotices()
        # Reserved pods whose network-free part is made (sandbox_run.prepare); in memory only,
        # so that after a restart a pod is prepared again from a clean slate.
        self.prepared: set[str] = set()
        self.features = Features()
        self.stats = StatsReader()

    def directories(self) -> tuple[str, ...]:
        """The directories runtimed keeps its state and runtime files in."""
        return (self.state_dir, self.run_dir, self.exit_dir, self.attach_dir,
                os.path.join(self.state_dir, "sandboxes"), os.path.join(self.state_dir, "containers"),
                os.path.join(self.run_dir, "sandboxes"))

    def sandbox_paths(self, sandbox_id: str) -> tuple[str, str]:
        """A pod's persistent directory and its runtime directory."""
        return (os.path.join(self.state_dir, "sandboxes", sandbox_id),
                os.path.join(self.run_dir, "sandboxes", sandbox_id))

    def bundle(self, container_id: str) -> str:
        return os.path.join(self.state_dir, "containers", container_id)

    # -- runtime handlers ---------------------------------------------------------

    def handler(self, name: str) -> RuntimeHandler:
        handler = self.rc.runtimes.get(name or self.rc.default_runtime)
        if handler is None:
            raise InvalidArgument(f"unknown runtime handler {name!r} (configured: {', '.join(sorted(self.rc.runtimes))})")
        if handler.runtime_type not in ("oci", ""):
            raise InvalidArgument(f"runtime handler {name!r} has unsupported type {handler.runtime_type!r}")
        return handler

    def runc_for(self, handler_name: str) -> Runc:
        handler = self.handler(handler_name)
        root = handler.runtime_root or os.path.join(self.state_dir, "runc")
        found = self.features.handler(handler_name)
        return Runc(path=handler.runtime_path, root=root, systemd_cgroup=self.systemd,
                    exec_fifo_start=found is not None and found.starts_through_exec_fifo)

    def runc(self, rec: dict) -> Runc:
        """The runc of a pod's or container's runtime handler."""
        return self.runc_for(rec.get("runtime_handler", ""))

    def rro(self, handler_name: str) -> tuple[bool, str]:
        """Whether the handler can make mounts read-only recursively, and why (not)."""
        found = self.features.handler(handler_name)
        if found is None:
            return False, f"runtime handler {handler_name!r} was not examined"
        return found.recursive_read_only_mounts, found.reason
