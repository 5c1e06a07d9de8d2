"""`criopy run`: start the five services, restart one that exits, stop them all on a signal.

Each service is its own process (`criopy service NAME`) with the same
configuration sources, forked from the fork server when there is one
(shared/forkserver.py), else started as a new interpreter. A service that
exits is restarted alone, after a backoff that doubles while it keeps
crashing and resets once it has stayed up.
The supervisor answers on the bus too (`supervisor`), so `criopy status` can
report restarts and `criopy restart NAME` can restart one service.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq.asyncio

from shared.bus.api import SUPERVISOR
from shared.bus.server import BusServer
from shared.bus.service import Service, method
from shared.config import Config
from shared.config_load import ConfigSources
from shared.errors import ConfigError, InvalidArgument
from shared.forkserver import ForkedProcess, ForkServer
from shared.reload import reload_into
from shared.services import START_ORDER

log = structlog.get_logger(__name__)

# A service that stayed up this long is healthy again: its backoff resets.
STABLE_AFTER = 30.0


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process | ForkedProcess | None = None
    started_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    last_error: str = ""
    backoff: float = 0.0
    restart_now: asyncio.Event = field(default_factory=asyncio.Event)

    def describe(self) -> dict[str, Any]:
        running = self.process is not None and self.process.returncode is None
        return {
            "name": self.name, "pid": self.process.pid if running and self.process else None,
            "running": running, "started_at": self.started_at, "restarts": self.restarts,
            "last_exit": self.last_exit, "last_error": self.last_error,
        }


class SupervisorApi(Service):
    """The supervisor's own bus API."""

    api = SUPERVISOR
    capabilities = None

    def __init__(self, config: Config, supervisor: "Supervisor") -> None:
        super().__init__(config)
        self.supervisor = supervisor

    @method
    async def services(self) -> list[dict[str, Any]]:
        return [child.describe() for child in self.supervisor.children.values()]

    @method
    async def reload(self) -> dict[str, Any]:
        """Read the configuration again; refused (and nothing changes) when it is broken."""
        return self.supervisor.reload()

    @method
    async def restart(self, service: str) -> dict[str, Any]:
        child = self.supervisor.children.get(service)
        if child is None:
            raise InvalidArgument(f"unknown service {service!r}")
        await self.supervisor.restart(child)
        return child.describe()


class Supervisor:
    def __init__(self, config: Config, sources: ConfigSources, services: tuple[str, ...] = START_ORDER,
                 forks: ForkServer | None = None) -> None:
        self.config = config
        self.sources = sources
        self.forks = forks
        self.children = {name: Child(name) for name in services}
        self._stopping = False

    def _command(self, name: str) -> list[str]:
        return [sys.executable, "-m", "shared.cli", *self.sources.argv(), "service", name]

    async def _spawn(self, child: Child) -> None:
        if self.forks is not None and self.forks.alive:
            try:
                # In a process group of its own too.
                child.process = await self.forks.spawn([*self.sources.argv(), "service", child.name])
                child.started_at = time.time()
                log.info("service_started", child=child.name, pid=child.process.pid, forked=True)
                return
            except ConnectionError as e:
                log.error("service_fork_failed", child=child.name, error=str(e))
        # Its own process group: a Ctrl-C reaches only the supervisor, which
        # then stops the services in order.
        child.process = await asyncio.create_subprocess_exec(*self._command(child.name), process_group=0)
        child.started_at = time.time()
        log.info("service_started", child=child.name, pid=child.process.pid)

    async def _watch(self, child: Child) -> None:
        settings = self.config.criopy.supervisor
        while not self._stopping:
            assert child.process is not None
            returncode = await child.process.wait()
            if self._stopping:
                return
            uptime = time.time() - child.started_at
            child.last_exit = returncode
            if child.restart_now.is_set():
                child.restart_now.clear()
                child.backoff = 0.0
                child.last_error = "restarted on request"
            else:
                child.last_error = f"exited with status {returncode} after {uptime:.1f}s"
                child.backoff = (settings.restart_backoff_initial if uptime > STABLE_AFTER or not child.backoff
                                 else min(child.backoff * 2, settings.restart_backoff_max))
            child.restarts += 1
            log.warning("service_exited", child=child.name, returncode=returncode,
                        uptime=round(uptime, 3), restart_in=child.backoff)
            await asyncio.sleep(child.backoff)
            if self._stopping:
                return
            await self._spawn(child)

    def reload(self) -> dict[str, Any]:
        """Check the configuration files, then have every service reload them."""
        try:
            result = reload_into(self.config, self.sources)
        except ConfigError as e:
            log.error("config_reload_refused", error=e.message)
            raise
        for child in self.children.values():
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(signal.SIGHUP)
        log.info("config_reloaded", **result.describe())
        return result.describe()

    def _on_hangup(self) -> None:
        try:
            self.reload()
        except ConfigError:
            pass  # logged; the running configuration stays

    async def restart(self, child: Child) -> None:
        if child.process is None or child.process.returncode is not None:
            return
        child.restart_now.set()
        child.process.send_signal(signal.SIGTERM)

    async def _stop_child(self, child: Child) -> None:
        proc = child.process
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.config.criopy.supervisor.stop_timeout)
        except TimeoutError:
            log.warning("service_kill", child=child.name, pid=proc.pid)
            proc.kill()
            await proc.wait()
        log.info("service_stopped", child=child.name, returncode=proc.returncode)

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        context = zmq.asyncio.Context()
        api = SupervisorApi(self.config, self)
        server = BusServer(api, self.config.bus_endpoint("supervisor"),
                           max_message_bytes=self.config.criopy.bus.max_message_bytes, context=context)
        await server.start()
        watchers = []
        try:
            for child in self.children.values():
                await self._spawn(child)
                watchers.append(asyncio.create_task(self._watch(child)))
            if self.forks is not None:
                await self.forks.close()  # it served its purpose; restarts start new interpreters
            log.info("criopy_running", socket=self.config.crio.api.listen)
            await stop.wait()
        finally:
            self._stopping = True
            log.info("criopy_stopping")
            # The frontend first, so no new CRI call reaches a stopping daemon.
            for child in reversed(list(self.children.values())):
                await self._stop_child(child)
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            if self.forks is not None:
                await self.forks.close()
            await server.close()
            context.term()
        log.info("criopy_stopped")
        return 0
