"""The OpenTelemetry SDK side of tracing: recording spans and exporting them (imported only when tracing is on).

One SDK tracer provider per process; its exporter and sampler can be
replaced when the configuration is reloaded (OpenTelemetry allows one
provider per process). `console` writes one JSON object per span to stdout,
`otlp` sends them to a collector over gRPC, and a process without network
hands its OTLP-encoded spans to the frontend over the bus.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, Callable, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor,
                                            SpanExporter, SpanExportResult)
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult, TraceIdRatioBased

from shared.config import TracingConfig
from shared.errors import ConfigError
from shared.version import VERSION


def _compact(span: ReadableSpan) -> str:
    return json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n"


class _Switchable(SpanProcessor, Sampler):
    """The exporter and sampler of the process, replaceable when the configuration is reloaded."""

    def __init__(self) -> None:
        self.processor: SpanProcessor | None = None
        self.sampler: Sampler = ParentBased(TraceIdRatioBased(1.0))

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.processor is not None:
            self.processor.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self.processor is not None:
            self.processor.on_end(span)

    def shutdown(self) -> None:
        if self.processor is not None:
            self.processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.processor.force_flush(timeout_millis) if self.processor is not None else True

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        if self.processor is None:
            return _NOT_RECORDED  # nothing would export the span: keep only its ids
        return self.sampler.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return f"criopy({self.sampler.get_description()})"


_NOT_RECORDED = SamplingResult(Decision.DROP)
_switch = _Switchable()


class _RelayExporter(SpanExporter):
    """For a service with no network: its spans go to the frontend over the bus, which sends them on."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send: Callable[[bytes], None] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, send: Callable[[bytes], None]) -> None:
        self._loop, self._send = loop, send

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._loop is None or self._send is None or self._loop.is_closed():
            return SpanExportResult.FAILURE
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        # The export runs in the processor's thread; the bus socket belongs to the event loop.
        self._loop.call_soon_threadsafe(self._send, encode_spans(spans).SerializeToString())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._send = None


relay = _RelayExporter()


def _processor(settings: TracingConfig, relayed: bool) -> SpanProcessor | None:
    if not settings.enable_tracing:
        return None
    if settings.tracing_exporter == "console":
        return SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout, formatter=_compact))
    if relayed:
        return BatchSpanProcessor(relay)
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            "crio.tracing: the otlp exporter needs the package "
            "opentelemetry-exporter-otlp-proto-grpc (pip install 'crio-py[otlp]')") from None
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.tracing_endpoint, insecure=True))


def provider(service: str, settings: TracingConfig, *, relayed: bool,
             current: TracerProvider | None) -> TracerProvider:
    """The process's SDK provider (`current`, or a new one) with the exporter and sampling of `settings`."""
    rate = max(0, min(settings.tracing_sampling_rate_per_million, 1_000_000)) / 1_000_000
    old = _switch.processor
    _switch.processor = _processor(settings, relayed)
    _switch.sampler = ParentBased(TraceIdRatioBased(rate))
    if old is not None:
        old.shutdown()
    if current is not None:
        return current
    made = TracerProvider(
        resource=Resource.create({"service.name": f"criopy-{service}", "service.version": VERSION}),
        sampler=_switch)
    made.add_span_processor(_switch)
    return made
