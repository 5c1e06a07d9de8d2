"""Running one service as a process: privileges, logs, tracing, the bus, signals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal

import structlog
import zmq.asyncio

from shared import log as logs
from shared import faults, privileges, tracing
from shared.bus.events import SPANS_TOPIC, EventPublisher
from shared.bus.server import BusServer
from shared.bus.service import Service
from shared.bus.streams import StreamListener
from shared.config import Config
from shared.config_load import ConfigSources
from shared.errors import ConfigError
from shared.reload import ReloadResult, reload_into
from shared.services import service_class

log = structlog.get_logger(__name__)

# Threads for blocking file work (asyncio.to_thread). Most of it waits on the disk (a record's fsync,
# a tree removed), not on the CPU: Python's default (CPU count + 4) let a burst of pods flush a few
# records at a time, each pod waiting for the others' flushes, where the file system writes
# many concurrent flushes in one journal commit.
BLOCKING_THREADS = 32


def run_service(name: str, config: Config, sources: ConfigSources) -> int:
    cls = service_class(name)
    # A class that does not implement exactly its row of the API table is refused (ApiMismatch).
    cls.bus_methods()
    if not cls.network:
        privileges.isolate_network()
    # Capabilities are per thread: drop them while this is the only thread,
    # before any request can be read.
    kept = privileges.restrict_to(cls.declared_capabilities())
    logs.configure(name, config.criopy.log.level_of(name, config.crio.runtime.log_level), config.criopy.log.log_format)
    tracing.configure(name, config.crio.tracing, relayed=not cls.network)
    faults.arm(os.environ)
    log.info("service_starting", capabilities=sorted(kept))
    try:
        asyncio.run(_serve(cls(config), config, sources))
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
    if any(path.startswith("crio.tracing.") for path in result.applied):
        tracing.configure(service.name, config.crio.tracing)
    await service.apply_config(result)
    log.info("config_reloaded", **result.describe())
    return result


async def _serve(service: Service, config: Config, sources: ConfigSources) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(BLOCKING_THREADS, f"{service.name}-blocking"))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[object]] = set()

    def on_hangup() -> None:
        task = asyncio.create_task(reload_service(service, sources))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    context = zmq.asyncio.Context()
    server = BusServer(service, config.bus_endpoint(service.name),
                       max_message_bytes=config.criopy.bus.max_message_bytes, context=context)
    if service.publishes_events or not service.network:
        service.publisher = EventPublisher(config.events_endpoint(service.name), context)
        service.publisher.bind()
    if service.serves_streams:
        service.streams = StreamListener(service.name, config.stream_socket(service.name))
    if not service.network:
        publisher = service.publisher
        tracing.attach_relay(loop, lambda spans: publisher.publish(SPANS_TOPIC, {"otlp": spans}))
    try:
        # State is reloaded and reconciled before the first request is read.
        await service.start()
        if service.streams is not None:
            await service.streams.start()
        await server.start()
        service.ready = True
        log.info("service_ready")
        await stop.wait()
        log.info("service_stopping")
    finally:
        await server.close()
        if service.streams is not None:
            # Before stop(): sessions end while what they use is still there.
            await service.streams.close()
        await service.stop()
        if service.publisher is not None:
            service.publisher.close()
        context.term()
    log.info("service_stopped")
