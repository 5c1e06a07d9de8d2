"""`criopy run`: start the five services, restart one that exits, stop them all on a signal.

Each service is its own process (`criopy service NAME`) with the same
configuration sources, forked from the fork server when there is one
(shared/forkserver.py), else started as a new interpreter; either way as root: it takes its own identity itself
(shared/daemon.py), as under systemd. Before any starts, the supervisor takes
its lock (a second `criopy run` refuses to start), checks that no service runs
already on its own, and finds or creates the system accounts
(shared/accounts.py). A service that exits is restarted alone, after a
backoff that doubles while it keeps crashing and resets once it has stayed up.

The supervisor never calls a service. Each one says when it is ready over
systemd's notify protocol (shared/notify.py); its pid, start time and
restarts the supervisor knows, and its uid, gids and capabilities it reads
from /proc. The supervisor answers root alone, on a socket in a directory
only root may enter (`criopy status`, `criopy restart NAME`, `criopy reload`),
and passes each service its restart count in its environment, for the
service's own metrics.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq.asyncio

from shared import accounts, identities, instance_lock, layout, malloc, notify
from shared.bus.api import SUPERVISOR
from shared.bus.server import BusServer
from shared.bus.service import Service, method
from shared.config import Config
from shared.config_load import ConfigSources
from shared.daemon import RESTARTS_ENV
from shared.errors import ConfigError, InvalidArgument
from shared.forkserver import ForkedProcess, ForkServer
from shared.reload import reload_into
from shared.services import START_ORDER
from shared.version import VERSION

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
    # Said by the service itself (shared/notify.py).
    ready: bool = False
    log_level: str | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def describe(self) -> dict[str, Any]:
        running = self.running
        ready = running and self.ready
        report: dict[str, Any] = {
            "name": self.name, "service": self.name, "pid": self.process.pid if running and self.process else None,
            "running": running, "ready": ready, "state": "up" if ready else "starting" if running else "down",
            "started_at": self.started_at, "restarts": self.restarts,
            "last_exit": self.last_exit, "last_error": self.last_error, "version": VERSION,
            "log_level": self.log_level,
        }
        if running and self.process is not None:
            report["uptime"] = time.time() - self.started_at
            try:
                report.update(identities.describe_process(self.process.pid))
            except (OSError, KeyError, ValueError):
                pass  # exited meanwhile
        return report


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
        extra = {notify.ENV: str(self.config.notify_socket()), RESTARTS_ENV: str(child.restarts)}
        child.ready = False
        if self.forks is not None and self.forks.alive:
            try:
                # In a process group of its own too.
                child.process = await self.forks.spawn([*self.sources.argv(), "service", child.name], extra)
                child.started_at = time.time()
                log.info("service_started", child=child.name, pid=child.process.pid, forked=True)
                return
            except ConnectionError as e:
                log.error("service_fork_failed", child=child.name, error=str(e))
        # Its own process group: a Ctrl-C reaches only the supervisor, which
        # then stops the services in order.
        child.process = await asyncio.create_subprocess_exec(*self._command(child.name), process_group=0,
                                                             env={**os.environ, **extra})
        child.started_at = time.time()
        log.info("service_started", child=child.name, pid=child.process.pid)

    def _notified(self, pid: int, fields: dict[str, str]) -> None:
        """A service's notification; believed only from the process of a child."""
        child = next((c for c in self.children.values() if c.running and c.process and c.process.pid == pid), None)
        if child is None:
            log.warning("notify_ignored", pid=pid, fields=sorted(fields))
            return
        if fields.get("READY") == "1":
            child.ready = True
            log.info("service_ready", child=child.name, pid=pid)
        if fields.get("STOPPING") == "1":
            child.ready = False
        if notify.LOG_LEVEL in fields:
            child.log_level = fields[notify.LOG_LEVEL]

    async def _watch(self, child: Child) -> None:
        settings = self.config.criopy.supervisor
        while not self._stopping:
            assert child.process is not None
            returncode = await child.process.wait()
            if self._stopping:
                return
            uptime = time.time() - child.started_at
            child.ready = False
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
        api.ready = True
        listener = notify.NotifyListener(self.config.notify_socket(), self._notified)
        listener.start()
        watchers = []
        try:
            for child in self.children.values():
                await self._spawn(child)
                watchers.append(asyncio.create_task(self._watch(child)))
            log.info("criopy_running", socket=self.config.crio.api.listen)
            malloc.trim()
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
            listener.close()
            await server.close()
            context.term()
        log.info("criopy_stopped")
        return 0


def run_supervisor(config: Config, sources: ConfigSources, forks: ForkServer | None = None) -> int:
    """`criopy run`: take the lock, check that no service runs alone, find or create the accounts, supervise."""
    layout.prepare("supervisor", config)
    # Held, through its open descriptor, until the process ends.
    instance_lock.acquire(config.lock_file("supervisor"), "criopy run")
    for name in START_ORDER:
        pid = instance_lock.holder(config.lock_file(name))
        if pid is not None:
            raise instance_lock.AlreadyRunning(
                f"criopy service {name} is already running (pid {pid}); stop it before `criopy run`")
    accounts.ensure(config)
    return asyncio.run(Supervisor(config, sources, forks=forks).run())
