"""The CRI gRPC server on the unix socket.

Every CRI method goes through one wrapper that gives the call a request id
(in every log line), a span (the root of the call's trace), a deadline for the
daemons' work, and turns typed errors into gRPC status codes.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from functools import partial
from typing import Any, Callable

import grpc
import structlog
from cri_api.v1 import api_pb2, api_pb2_grpc
from opentelemetry import trace

from services.frontend.grpc_errors import status_code
from services.frontend.registry import CallContext, load_handlers
from services.frontend.routing import route_to_owner
from shared import identities, metrics, tracing
from shared.bus import ipc
from shared.config import Config
from shared.errors import CriopyError, Internal, Unimplemented
from shared.log import bind_request, debug_enabled

log = structlog.get_logger(__name__)

# Time kept back from the kubelet's deadline so that crio-py's own answer (still
# DEADLINE_EXCEEDED, but saying what it was waiting on) arrives before the
# client's timer fires; at most a tenth of a short deadline.
DEADLINE_MARGIN = 0.05

_SERVICES = {
    "RuntimeService": (api_pb2_grpc.RuntimeServiceServicer, api_pb2_grpc.add_RuntimeServiceServicer_to_server),
    "ImageService": (api_pb2_grpc.ImageServiceServicer, api_pb2_grpc.add_ImageServiceServicer_to_server),
}


_ID_FIELDS = ("pod_sandbox_id", "container_id")


def _ids(request: Any, fields: tuple[str, ...]) -> dict[str, str]:
    """The pod and container ids a request names (of `fields`, those its type has), for its log lines."""
    ids = {}
    for name in fields:
        value = getattr(request, name)
        if value:
            ids[name] = value
    return ids


class _Wrapper:
    def __init__(self, daemons: Any, config: Config) -> None:
        self.daemons = daemons
        self.config = config

    def _context(self, grpc_context: grpc.aio.ServicerContext) -> CallContext:
        remaining = grpc_context.time_remaining()
        if remaining is None:
            remaining = self.config.criopy.bus.default_timeout
        else:
            remaining = max(0.0, remaining - min(DEADLINE_MARGIN, remaining * 0.1))
        return CallContext(self.daemons, self.config, time.time() + remaining, os.urandom(8).hex(), grpc_context)

    def unary(self, full_name: str, handler: Callable[..., Any], id_fields: tuple[str, ...]) -> Callable[..., Any]:
        operation = full_name.split("/")[1]
        span_name = f"/runtime.v1.{full_name}"
        attributes = {"rpc.system": "grpc", "rpc.method": full_name}

        async def method(_servicer: Any, request: Any, grpc_context: grpc.aio.ServicerContext) -> Any:
            call = self._context(grpc_context)
            error: CriopyError | None = None
            with bind_request(call.request_id, cri_method=full_name, **_ids(request, id_fields)), \
                    tracing.tracer(__name__).start_as_current_span(
                        span_name, kind=trace.SpanKind.SERVER, attributes=attributes) as span:
                started = time.monotonic()
                try:
                    response = await handler(request, call)
                except CriopyError as e:
                    error = e
                except asyncio.CancelledError:
                    # gRPC cancels the handler when the caller goes away or its deadline passes.
                    left = grpc_context.time_remaining()
                    gone = "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
                    metrics.observe_operation(operation, gone, time.monotonic() - started)
                    log.info("cri_call_abandoned", code=gone)
                    raise
                except Exception as e:
                    log.exception("cri_call_crashed")
                    error = Internal(f"{full_name} failed: {e}")
                    span.record_exception(e)
                elapsed = time.monotonic() - started
                elapsed_ms = round(elapsed * 1000, 3)
                metrics.observe_operation(operation, error.code if error else "OK", elapsed)
                if error is None:
                    if debug_enabled():
                        log.debug("cri_call", duration_ms=elapsed_ms, code="OK")
                    return response
                span.set_attribute("rpc.grpc.status_code", status_code(error).value[0])
                log.info("cri_call_failed", duration_ms=elapsed_ms, code=error.code, error=error.message)
            await grpc_context.abort(status_code(error), error.message)

        return method

    def streaming(self, full_name: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        async def method(_servicer: Any, request: Any, grpc_context: grpc.aio.ServicerContext) -> Any:
            call = self._context(grpc_context)
            error: CriopyError | None = None
            with bind_request(call.request_id, cri_method=full_name):
                try:
                    async for item in handler(request, call):
                        yield item
                except CriopyError as e:
                    error = e
            if error is not None:
                await grpc_context.abort(status_code(error), error.message)

        return method


async def _unimplemented_stream(name: str, _request: Any, _call: CallContext) -> Any:
    raise Unimplemented(f"{name} is not implemented by crio-py yet")
    yield  # pragma: no cover - makes this an async generator


def build_servicers(daemons: Any, config: Config) -> list[tuple[Any, Callable[[Any, Any], None]]]:
    """One servicer per CRI service, every method wired to its handler or its default route."""
    handlers = load_handlers()
    wrapper = _Wrapper(daemons, config)
    servicers = []
    for service_name, (base, add_to_server) in _SERVICES.items():
        descriptor = api_pb2.DESCRIPTOR.services_by_name[service_name]
        methods: dict[str, Any] = {}
        for m in descriptor.methods:
            full_name = f"{service_name}/{m.name}"
            handler = handlers.get(m.name)
            if m.server_streaming:
                if handler is None:
                    handler = partial(_unimplemented_stream, m.name)
                methods[m.name] = wrapper.streaming(full_name, handler)
            else:
                if handler is None:
                    handler = partial(route_to_owner, m.name)
                elif inspect.isasyncgenfunction(handler):
                    raise TypeError(f"{m.name} is unary but its handler is a generator")
                id_fields = tuple(f for f in _ID_FIELDS if f in m.input_type.fields_by_name)
                methods[m.name] = wrapper.unary(full_name, handler, id_fields)
        servicer_cls = type(f"Criopy{service_name}", (base,), methods)
        servicers.append((servicer_cls(), add_to_server))
    return servicers


async def bind_server(daemons: Any, config: Config) -> grpc.aio.Server:
    """The server, its CRI socket bound (root's, mode listen_mode, group listen_group) but not serving yet.

    Binding happens at once in gRPC; requests are read only once the caller starts the server.
    """
    listen = config.crio.api.listen
    os.makedirs(os.path.dirname(listen), mode=0o755, exist_ok=True)
    ipc.claim(listen)  # a stale socket from a previous run; never one another frontend serves
    server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", config.crio.api.grpc_max_send_msg_size),
        ("grpc.max_receive_message_length", config.crio.api.grpc_max_recv_msg_size),
    ])
    for servicer, add_to_server in build_servicers(daemons, config):
        add_to_server(servicer, server)
    server.add_insecure_port(f"unix://{listen}")
    group = identities.group_id(config.crio.api.listen_group) if config.crio.api.listen_group else 0
    os.chown(listen, 0, group)
    os.chmod(listen, int(config.crio.api.listen_mode, 8))
    log.info("cri_listening", socket=listen, group=group)
    return server
