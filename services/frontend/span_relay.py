"""Sending on the spans of services that have no network (storaged) to the OTLP collector.

Such a service publishes its finished spans, already encoded as an OTLP
ExportTraceServiceRequest, on its event socket; the frontend, which may reach
the network, passes them to the collector unchanged. Spans are telemetry: one
that cannot be delivered is dropped, never retried at the cost of CRI calls.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import structlog
import zmq.asyncio

from shared.bus.api import API
from shared.bus.events import SPANS_TOPIC, EventSubscriber
from shared.config import Config
from shared.services import DAEMONS

log = structlog.get_logger(__name__)

EXPORT_TIMEOUT = 10.0


class SpanRelay:
    def __init__(self, config: Config, context: zmq.asyncio.Context) -> None:
        self.config = config
        self._subscribers = [EventSubscriber(config.events_endpoint(name), context, topics=(SPANS_TOPIC,))
                             for name in DAEMONS if not API[name].network]
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None
        self._channel_target = ""

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump(s), name="span-relay") for s in self._subscribers]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for subscriber in self._subscribers:
            subscriber.close()
        if self._channel is not None:
            await self._channel.close()

    def _stub(self) -> Any:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        target = self.config.crio.tracing.tracing_endpoint  # read on each use: it may change on reload
        if self._channel is None or target != self._channel_target:
            if self._channel is not None:
                asyncio.create_task(self._channel.close())
            self._channel = grpc.aio.insecure_channel(target)
            self._channel_target = target
        return trace_service_pb2_grpc.TraceServiceStub(self._channel)

    async def _pump(self, subscriber: EventSubscriber) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        async for _topic, event in subscriber:
            tracing = self.config.crio.tracing
            if not (tracing.enable_tracing and tracing.tracing_exporter == "otlp"):
                continue
            try:
                request = ExportTraceServiceRequest.FromString(event["otlp"])
                await self._stub().Export(request, timeout=EXPORT_TIMEOUT)
            except Exception as e:  # telemetry never breaks the frontend
                log.debug("span_relay_dropped", error=str(e))
