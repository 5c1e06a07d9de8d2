"""The daemon side of the bus: a ROUTER socket that dispatches requests to a Service.

Each request runs in its own task (a slow pull does not hold up a status
call). Whatever arrives, the daemon survives it: a frame that is not an
envelope, an unknown method, bad params, a wrong protocol version or an
oversized message gets an error reply when it carries an id, and is logged and
dropped when it does not. A handler that raises anything but a typed error
becomes INTERNAL, with the exception logged.

Every request is checked against its method's callers in the API table, with
the caller named from its connection's credentials (shared/bus/peers.py): a
caller the table does not list is answered PERMISSION_DENIED, logged and
counted, and the method never runs. A caller of none of the service's methods
is refused before its message is even decoded. The reply of a service with a
state feed carries the feed's position (shared/bus/feed.py).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from typing import Any, Callable

import structlog
import zmq.asyncio
from opentelemetry import trace

from shared import tracing
from shared.bus import sockets
from shared.bus.envelope import MalformedMessage, Reply, decode_request, peek_request_id
from shared.bus.peers import BUS_DOMAIN, Caller, ZapHandler, refused, request_caller
from shared.bus.service import Service
from shared.errors import (CriopyError, DeadlineExceeded, Internal, InvalidArgument, PermissionDenied,
                           ResourceExhausted, Unimplemented)
from shared.log import bind_request, debug_enabled

log = structlog.get_logger(__name__)

# Requests served at once; more wait in ZeroMQ's queue.
MAX_CONCURRENT_REQUESTS = 256


@functools.cache
def _keywords(func: Callable[..., Any]) -> tuple[frozenset[str], frozenset[str]] | None:
    """The params a bus method requires and those it accepts, when keywords alone decide a call
    (None otherwise): checking a request's params against them costs a tenth of Signature.bind,
    which is left to explain a refusal."""
    params = list(inspect.signature(func).parameters.values())[1:]  # after self
    if any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params):
        return None
    return frozenset(p.name for p in params if p.default is p.empty), frozenset(p.name for p in params)


class BusServer:
    def __init__(self, service: Service, endpoint: str, *, max_message_bytes: int,
                 context: zmq.asyncio.Context | None = None) -> None:
        self.service = service
        self.endpoint = endpoint
        self.max_message_bytes = max_message_bytes
        self._context = context or zmq.asyncio.Context.instance()
        self._methods = type(service).bus_methods()
        self._callers = service.api.callers
        self._zap: ZapHandler | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)

    async def start(self) -> None:
        self._zap = ZapHandler.acquire(self._context, self.service.config)
        self._socket = sockets.router(self._context, self.endpoint, max_message_bytes=self.max_message_bytes,
                                      zap_domain=BUS_DOMAIN)
        self._receiver = asyncio.create_task(self._receive_loop(), name=f"bus-server-{self.service.name}")
        log.info("bus_listening", endpoint=self.endpoint, methods=sorted(self._methods))

    async def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._zap is not None:
            self._zap.release()
            self._zap = None

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart(copy=False)
            if len(frames) != 2:
                log.warning("bus_frame_dropped", reason=f"expected 2 frames, got {len(frames)}")
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._serve(frames[0].bytes, frames[1].bytes, request_caller(frames[1])))
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _send(self, identity: bytes, reply: Reply) -> None:
        try:
            payload = reply.encode()
        except (TypeError, ValueError, OverflowError) as e:
            log.error("bus_reply_unserialisable", request_id=reply.id, error=str(e))
            payload = Reply(reply.id, error=Internal(f"reply could not be encoded: {e}")).encode()
        if self._socket is not None:
            await self._socket.send_multipart([identity, payload])

    async def _serve(self, identity: bytes, payload: bytes, caller: Caller) -> None:
        try:
            if not caller.may(self._callers):
                await self._refuse(identity, caller, peek_request_id(payload), method=None)
                return
            if len(payload) > self.max_message_bytes:
                request_id = peek_request_id(payload)
                error = ResourceExhausted(
                    f"message of {len(payload)} bytes exceeds the limit of {self.max_message_bytes} bytes")
                if request_id is None:
                    log.warning("bus_message_dropped", reason=error.message)
                    return
                await self._send(identity, Reply(request_id, error=error))
                return
            try:
                request = decode_request(payload)
            except MalformedMessage as e:
                if e.request_id is None:
                    log.warning("bus_message_dropped", reason=e.message)
                else:
                    log.warning("bus_message_rejected", request_id=e.request_id, reason=e.message)
                    await self._send(identity, Reply(e.request_id, error=e))
                return
            spec = self._methods.get(request.method)
            if spec is not None and not caller.may(spec.info.callers):
                await self._refuse(identity, caller, request.id, method=request.method)
                return
            reply = await self._dispatch(request.id, request.method, request.params,
                                         request.deadline, request.traceparent)
            if self.service.feed is not None:
                # Every change the request made is published by now: the caller learns how far to read.
                reply.seq = self.service.feed.position()
            await self._send(identity, reply)
        except asyncio.CancelledError:
            raise
        except Exception:  # the daemon must outlive any single message
            log.exception("bus_serve_failed")

    async def _refuse(self, identity: bytes, caller: Caller, request_id: str | None,
                      method: str | None) -> None:
        refused("call", caller, service=self.service.name, method=method)
        if request_id is not None:
            await self._send(identity, Reply(request_id, error=PermissionDenied(
                f"{caller.name} ({caller.peer}) may not call {self.service.name}.{method or 'anything'}")))

    async def _dispatch(self, request_id: str, method: str, params: dict[str, Any],
                        deadline: float, traceparent: str | None) -> Reply:
        spec = self._methods.get(method)
        if spec is None:
            return Reply(request_id, error=Unimplemented(
                f"{self.service.name} does not implement {method!r}"))
        keywords = _keywords(spec.func)
        if keywords is None or not keywords[0] <= params.keys() <= keywords[1]:
            try:
                spec.signature.bind(self.service, **params)
            except TypeError as e:
                return Reply(request_id, error=InvalidArgument(f"{self.service.name}.{method}: bad params: {e}"))
        remaining = deadline - time.time()
        if remaining <= 0:
            return Reply(request_id, error=DeadlineExceeded(
                f"{self.service.name}.{method}: deadline passed before the request was served"))

        parent = tracing.context_from_traceparent(traceparent)
        with bind_request(request_id, method=method), \
                tracing.tracer(__name__).start_as_current_span(
                    f"{self.service.name}/{method}", context=parent, kind=trace.SpanKind.SERVER,
                    attributes={"rpc.system": "criopy-bus", "rpc.service": self.service.name,
                                "rpc.method": method}) as span:
            started = time.monotonic()
            try:
                async with asyncio.timeout(remaining):
                    result = await spec.func(self.service, **params)
                reply = Reply(request_id, result=result)
            except CriopyError as e:
                span.set_attribute("criopy.error_code", e.code)
                reply = Reply(request_id, error=e)
            except TimeoutError:
                reply = Reply(request_id, error=DeadlineExceeded(
                    f"{self.service.name}.{method}: did not finish before the caller's deadline"))
            except Exception as e:
                log.exception("bus_method_failed")
                span.record_exception(e)
                reply = Reply(request_id, error=Internal(f"{self.service.name}.{method} failed: {e}"))
            if debug_enabled():
                log.debug("bus_request_served", duration_ms=round((time.monotonic() - started) * 1000, 3),
                          error=reply.error.code if reply.error else None)
            return reply

