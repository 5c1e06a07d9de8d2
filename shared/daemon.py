"""Running one service as a process: identity, privileges, logs, tracing, the bus, signals.

A service becomes its identity (shared/identities.py) before it reads
anything from another process:

  1. started as root: the accounts exist (shared/accounts.py), its
     directories are in place (shared/layout.py), its lock is taken (a second
     instance stops here, naming the first one's pid);
  2. its capabilities are cut to what it keeps, plus what it needs only
     until it has changed user (CAP_SETUID, CAP_SETGID) or bound what root
     must bind (the frontend's CAP_CHOWN); those stay out of the bounding set;
  3. a service that keeps uid 0 takes its own group, one that runs as a user
     of its own changes user; the frontend does so only after `bind()` has
     opened the CRI socket, before it reads any request.

Under systemd the unit starts the service with the same identity already
(or as root with the frontend's three capabilities), and each step finds
nothing to do. `criopy run` passes two facts in the environment, read here
and removed so that no program the service runs inherits them: NOTIFY_SOCKET
(where to say it is ready, shared/notify.py) and CRIOPY_RESTARTS.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import signal

import structlog
import zmq.asyncio

from shared import accounts, faults, identities, instance_lock, layout, malloc, metrics, notify, privileges, tracing
from shared import log as logs
from shared.bus.events import SPANS_TOPIC, EventPublisher
from shared.bus.server import BusServer
from shared.bus.service import Service
from shared.bus.streams import StreamListener
from shared.config import Config
from shared.config_load import ConfigSources
from shared.errors import ConfigError, FailedPrecondition
from shared.identities import Credentials
from shared.reload import ReloadResult, reload_into
from shared.services import service_class

log = structlog.get_logger(__name__)

# Threads for blocking file work (asyncio.to_thread). Most of it waits on the disk (a record's fsync,
# a tree removed), not on the CPU: Python's default (CPU count + 4) let a burst of pods flush a few
# records at a time, each pod waiting for the others' flushes, where the file system writes
# many concurrent flushes in one journal commit.
BLOCKING_THREADS = 32

RESTARTS_ENV = "CRIOPY_RESTARTS"
# What changing user takes.
SWITCH_CAPABILITIES = frozenset({"CAP_SETUID", "CAP_SETGID"})


def run_service(name: str, config: Config, sources: ConfigSources) -> int:
    malloc.limit_arenas()  # before any thread starts
    cls = service_class(name)
    # A class that does not implement exactly its row of the API table is refused (ApiMismatch).
    cls.bus_methods()
    notify_target = os.environ.pop(notify.ENV, None)
    restarts = os.environ.pop(RESTARTS_ENV, "0")
    as_root = os.geteuid() == 0
    if as_root:
        accounts.ensure(config)
    target = identities.resolve(identities.identity(name, config))
    switching = privileges.needs_switch(target.uid, target.gid, target.groups)
    if switching and not as_root:
        raise FailedPrecondition(f"{name} runs as {identities.identity(name, config).user}: start it as root "
                                 f"or with that identity ({target.describe()})")
    if as_root:
        layout.prepare(name, config)
    # Held, through its open descriptor, until the process ends. Its owner is the service's user,
    # who may start it next time (systemd starts imaged as criopy-imaged); the frontend always starts as root.
    instance_lock.acquire(config.lock_file(name), f"criopy service {name}",
                          owner=(target.uid, target.gid) if as_root and not cls.bind_capabilities else None)
    if not cls.network:
        privileges.isolate_network()
    keeps = cls.declared_capabilities()
    # The frontend changes user only once its socket is bound; anything else at once.
    late = switching and target.uid != 0 and bool(cls.bind_capabilities)
    if target.uid != 0:
        privileges.no_new_privileges()
    # Capabilities are per thread: cut them while this is the only thread,
    # before any request can be read.
    kept = privileges.restrict_to(keeps | (SWITCH_CAPABILITIES if switching else frozenset()) | cls.bind_capabilities,
                                  bounding=keeps)
    if switching and not late:
        privileges.switch_to(target.uid, target.gid, target.groups)
        _check_code_readable()
        kept = privileges.restrict_to(keeps | cls.bind_capabilities)
    logs.configure(name, config.criopy.log.level_of(name, config.crio.runtime.log_level), config.criopy.log.log_format)
    tracing.configure(name, config.crio.tracing, relayed=not cls.network)
    faults.arm(os.environ)
    _restarts_before_start[0] = int(restarts) if restarts.isdigit() else 0
    _turn_metrics_on(config)
    log.info("service_starting", capabilities=sorted(kept), identity=target.describe())
    try:
        asyncio.run(_serve(cls(config), config, sources, late_switch=target if late else None,
                           notify_target=notify_target))
    finally:
        tracing.shutdown()
    return 0


async def reload_service(service: Service, sources: ConfigSources) -> ReloadResult | None:
    """Apply a changed configuration to a running service; a broken one is refused."""
    try:
        result = reload_into(service.config, sources)
    except ConfigError as e:
        log.error("config_reload_refused", error=e.message)
        return None
    config = service.config
    logs.configure(service.name, config.criopy.log.level_of(service.name, config.crio.runtime.log_level),
                   config.criopy.log.log_format)
    _turn_metrics_on(config)
    if any(path.startswith("crio.tracing.") for path in result.applied):
        tracing.configure(service.name, config.crio.tracing)
    await service.apply_config(result)
    log.info("config_reloaded", **result.describe())
    return result


# The supervisor's restart count, handed over at start, for metrics turned on later by a reload.
_restarts_before_start = [0]


def _turn_metrics_on(config: Config) -> None:
    """Count from now on when the configuration asks for metrics (at start, or at the reload that turns
    them on); a reload that turns them off leaves them counting, for the next scrape that comes."""
    if config.crio.metrics.enable_metrics and not metrics.enabled():
        metrics.enable()
        metrics.SERVICE_RESTARTS.inc(_restarts_before_start[0])


def _log_level(service: Service) -> str:
    return service.config.criopy.log.level_of(service.name, service.config.crio.runtime.log_level)


def _check_code_readable() -> None:
    """Once a user of its own, a service must still read Python's library and its own code (imports come late)."""
    for path in (os.path.dirname(os.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        if not os.access(path, os.R_OK | os.X_OK):
            raise FailedPrecondition(f"{path} cannot be read as uid {os.getuid()}: install Python and crio-py "
                                     "where every user may read them (make setup uses Debian's /usr/bin/python3)")


def _become(service: Service, target: Credentials) -> None:
    """The frontend's change of user, its socket bound: every thread leaves uid 0 and its capabilities."""
    privileges.switch_to(target.uid, target.gid, target.groups)
    _check_code_readable()
    kept = privileges.restrict_to(type(service).declared_capabilities())
    log.info("service_identity", identity=target.describe(), capabilities=sorted(kept))


async def _serve(service: Service, config: Config, sources: ConfigSources, *,
                 late_switch: Credentials | None, notify_target: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(BLOCKING_THREADS, f"{service.name}-blocking"))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[object]] = set()

    async def reload() -> None:
        if await reload_service(service, sources) is not None:
            notify.notify(notify_target, **{notify.LOG_LEVEL: _log_level(service)})

    def on_hangup() -> None:
        task = asyncio.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await service.bind()
    if late_switch is not None:
        _become(service, late_switch)
    elif type(service).bind_capabilities:
        # Kept root by the configuration: it drops what only the bind needed (in this thread).
        privileges.restrict_to(type(service).declared_capabilities())
    context = zmq.asyncio.Context()
    # A service nobody calls over the bus (the frontend) binds no bus socket.
    server = (BusServer(service, config.bus_endpoint(service.name),
                        max_message_bytes=config.criopy.bus.max_message_bytes, context=context)
              if service.api.callers else None)
    if service.publishes_events or not service.network:
        service.publisher = EventPublisher(config.events_endpoint(service.name), context, config)
        service.publisher.bind()
    if service.serves_streams:
        service.streams = StreamListener(service.name, config.stream_socket(service.name), config=config)
    if not service.network:
        publisher = service.publisher
        tracing.attach_relay(loop, lambda spans: publisher.publish(SPANS_TOPIC, {"otlp": spans}))
    try:
        # State is reloaded and reconciled before the first request is read.
        await service.start()
        # Start-up's garbage (configuration, imports' leftovers) goes, and the heap gives back what it
        # held: before the first request, which would otherwise wait for it.
        gc.collect()
        malloc.trim()
        if service.streams is not None:
            await service.streams.start()
        if server is not None:
            await server.start()
        service.ready = True
        log.info("service_ready")
        notify.notify(notify_target, READY="1", **{notify.LOG_LEVEL: _log_level(service)})
        await stop.wait()
        log.info("service_stopping")
        notify.notify(notify_target, STOPPING="1")
    finally:
        if server is not None:
            await server.close()
        if service.streams is not None:
            # Before stop(): sessions end while what they use is still there.
            await service.streams.close()
        await service.stop()
        if service.publisher is not None:
            service.publisher.close()
        context.term()
    log.info("service_stopped")
