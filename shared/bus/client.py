"""The caller side of the bus: one DEALER socket per daemon, used by the frontend.

Modelled on the ZeroMQ guide's "lazy pirate": the socket never queues a request
for a daemon that is not connected (ZMQ_IMMEDIATE), so such a request fails at
once and is retried; a socket monitor notices a daemon that goes away mid-call
and fails its pending requests. Idempotent methods are retried with backoff
until the caller's deadline; a non-idempotent one is retried only when it was
never delivered.

When the caller's deadline passes, the answer is DEADLINE_EXCEEDED, whatever
the call was waiting on: a slow daemon, a daemon that is down or restarting
(its message says so), or a retriable error the daemon kept answering. The
kubelet then sees the same code it would from CRI-O, and from its own timer.
UNAVAILABLE is the answer only when the client gives up before the deadline:
a non-idempotent call whose daemon went away after receiving it (its outcome
is unknown, so it must not be repeated), or a closed client.

`seq` is the furthest state-feed position a reply of the daemon carried
(shared/bus/feed.py): the frontend's read model answers no read before it has
got that far, so that a read that follows a write sees it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, Mapping

import structlog
import zmq
import zmq.asyncio
from opentelemetry import trace
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential

from shared import metrics, tracing
from shared.bus import sockets
from shared.bus.envelope import MalformedMessage, Request, decode_reply
from shared.bus.api import API, MethodInfo
from shared.config import Config
from shared.errors import CriopyError, DeadlineExceeded, Unavailable

log = structlog.get_logger(__name__)

# Backoff between attempts: 0.05 s after the first, then doubling up to 1 s.
FIRST_RETRY_WAIT = 0.05
MAX_RETRY_WAIT = 1.0


class _NotDelivered(Unavailable):
    """The request never left: no daemon was connected. Safe to retry any method."""


class _ConnectionLost(Unavailable):
    """The daemon went away after the request was sent: its outcome is unknown."""


class _NoAnswer(Unavailable):
    """No reply came before the deadline."""


class BusClient:
    def __init__(self, service: str, endpoint: str, methods: Mapping[str, MethodInfo], *,
                 context: zmq.asyncio.Context | None = None) -> None:
        self.service = service
        self.endpoint = endpoint
        self._methods = methods
        self._context = context or zmq.asyncio.Context.instance()
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        # (epoch, n): the furthest feed position the daemon's replies carried; a new epoch replaces it.
        self.seq: tuple[str, int] | None = None
        # Tenacity takes over from the second attempt on: its first wait is the call's second.
        self._retry_wait = wait_exponential(multiplier=2 * FIRST_RETRY_WAIT, max=MAX_RETRY_WAIT)

    @classmethod
    def for_service(cls, config: Config, service: str, context: zmq.asyncio.Context | None = None) -> "BusClient":
        """A client of one of crio-py's services, at its configured endpoint, knowing its methods from the table."""
        try:
            api = API[service]
        except KeyError:
            raise ValueError(f"unknown service {service!r} (services: {', '.join(API)})") from None
        return cls(service, config.bus_endpoint(service), api.methods, context=context)

    # -- connection -------------------------------------------------------

    def connect(self) -> None:
        sock = sockets.dealer(self._context)
        monitor = sockets.Monitor(sock, zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sockets.connect(sock, self.endpoint)
        self._socket = sock
        self._tasks = [
            asyncio.create_task(self._receive_loop(sock), name=f"bus-client-{self.service}"),
            asyncio.create_task(self._monitor_loop(monitor), name=f"bus-monitor-{self.service}"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self._fail_pending(Unavailable(f"connection to {self.service} closed"))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def _receive_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                reply = decode_reply(frames[-1])
            except MalformedMessage as e:
                log.warning("bus_reply_dropped", daemon=self.service, reason=e.message)
                continue
            if reply.seq is not None:
                seen = self.seq
                if seen is None or seen[0] != reply.seq[0] or seen[1] < reply.seq[1]:
                    self.seq = reply.seq
            future = self._pending.get(reply.id)
            if future is not None and not future.done():
                future.set_result(reply)

    async def _monitor_loop(self, monitor: sockets.Monitor) -> None:
        try:
            while True:
                event = await monitor.next()
                if event["event"] == zmq.EVENT_CONNECTED:
                    self._connected.set()
                    log.debug("bus_connected", daemon=self.service)
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    self._connected.clear()
                    log.info("bus_disconnected", daemon=self.service)
                    self._fail_pending(_ConnectionLost(f"{self.service} went away while serving the request"))
        finally:
            monitor.close()

    def _fail_pending(self, error: CriopyError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    # -- calls ------------------------------------------------------------

    def is_idempotent(self, method: str) -> bool:
        info = self._methods.get(method)
        return info is not None and info.idempotent

    async def call(self, method: str, *, deadline: float, **params: Any) -> Any:
        """Call `method` on the daemon; retries as the method allows until `deadline` (unix time)."""
        idempotent = self.is_idempotent(method)
        started = time.monotonic()
        outcome = "OK"
        try:
            return await self._call_with_retries(method, params, deadline, idempotent)
        except CriopyError as e:
            outcome = e.code
            raise
        finally:
            metrics.labelled(metrics.BUS_CALLS, self.service, method, outcome).inc()
            metrics.labelled(metrics.BUS_CALL_LATENCY, self.service, method).observe(time.monotonic() - started)

    async def _call_with_retries(self, method: str, params: dict[str, Any], deadline: float,
                                 idempotent: bool) -> Any:
        # Why the last attempt failed in a way worth retrying: what the call was waiting on.
        waiting_on: list[str] = []

        def retriable(error: BaseException) -> bool:
            worth = isinstance(error, _NotDelivered) or (
                idempotent and isinstance(error, CriopyError) and error.retriable)
            if worth:
                waiting_on[:] = [error.message]  # type: ignore[attr-defined]
            return worth

        def wait(state: Any) -> float:
            return max(0.0, min(self._retry_wait(state), deadline - time.time()))

        def out_of_time(_state: Any = None) -> bool:
            return time.time() >= deadline

        with tracing.tracer(__name__).start_as_current_span(
                f"bus {self.service}.{method}", kind=trace.SpanKind.CLIENT,
                attributes={"rpc.system": "criopy-bus", "rpc.service": self.service, "rpc.method": method}) as span:
            try:
                # The first attempt goes without tenacity, whose set-up costs more than the
                # rest of a call that succeeds at once; retries go through it.
                span.set_attribute("criopy.bus.attempts", 1)
                try:
                    return await self._attempt(method, params, deadline)
                except CriopyError as e:
                    if not retriable(e) or out_of_time():
                        raise
                await asyncio.sleep(max(0.0, min(FIRST_RETRY_WAIT, deadline - time.time())))
                attempts = itertools.count(2)
                async for attempt in AsyncRetrying(retry=retry_if_exception(retriable), wait=wait,
                                                   stop=out_of_time, reraise=True):
                    with attempt:
                        span.set_attribute("criopy.bus.attempts", next(attempts))
                        return await self._attempt(method, params, deadline)
            except CriopyError as e:
                if isinstance(e, _ConnectionLost) and not idempotent:
                    raise Unavailable(
                        f"{self.service} went away while serving {method}, which is not safe to retry; "
                        "its outcome is unknown", retriable=False) from None
                if isinstance(e, _NoAnswer) or (time.time() >= deadline and retriable(e)):
                    reason = waiting_on[0] if waiting_on else e.message
                    raise DeadlineExceeded(
                        f"{self.service}.{method} did not complete before the caller's deadline: {reason}") from None
                raise
        raise AssertionError("unreachable")

    async def _attempt(self, method: str, params: dict[str, Any], deadline: float) -> Any:
        if self._socket is None:
            raise Unavailable(f"bus client for {self.service} is closed", retriable=False)
        remaining = deadline - time.time()
        if remaining <= 0:
            raise _NoAnswer("the deadline passed", retriable=False)
        request = Request(method=method, params=params, deadline=deadline,
                          traceparent=tracing.current_traceparent())
        payload = request.encode()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = future
        try:
            try:
                await self._socket.send(payload, flags=zmq.NOBLOCK)
            except zmq.Again:
                raise _NotDelivered(f"{self.service} is not connected (down or restarting)") from None
            try:
                async with asyncio.timeout(remaining):
                    reply = await future
            except TimeoutError:
                raise _NoAnswer(f"{self.service} did not answer in time", retriable=False) from None
        finally:
            self._pending.pop(request.id, None)
        if reply.error is not None:
            raise reply.error
        return reply.result
