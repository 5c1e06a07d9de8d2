"""Running one service as a process: privileges, logs, tracing, the bus, signals."""

from __future__ import annotations

import asyncio
import signal

import structlog
import zmq.asyncio

from shared import log as logs
from shared import privileges, tracing
from shared.bus.server import BusServer
from shared.config import Config
from shared.services import service_class

log = structlog.get_logger(__name__)


def run_service(name: str, config: Config) -> int:
    cls = service_class(name)
    # Capabilities are per thread: drop them while this is the only thread,
    # before any request can be read.
    kept = privileges.restrict_to(cls.declared_capabilities())
    logs.configure(name, config.crio.runtime.log_level, config.criopy.log.log_format)
    tracing.configure(name, config.crio.tracing)
    log.info("service_starting", capabilities=sorted(kept))
    try:
        asyncio.run(_serve(cls(config), config))
    finally:
        tracing.shutdown()
    return 0


async def _serve(service, config: Config) -> None:  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    context = zmq.asyncio.Context()
    server = BusServer(service, config.bus_endpoint(service.name),
                       max_message_bytes=config.criopy.bus.max_message_bytes, context=context)
    try:
        # State is reloaded and reconciled before the first request is read.
        await service.start()
        await server.start()
        service.ready = True
        log.info("service_ready")
        await stop.wait()
        log.info("service_stopping")
    finally:
        await server.close()
        await service.stop()
        context.term()
    log.info("service_stopped")
