"""OpenTelemetry tracing: one tracer provider per process, context in the bus envelope.

The frontend opens a span per CRI call; the bus client injects its W3C
`traceparent` into each request and the daemon continues the trace from it,
so one CRI call is one trace across processes. Spans always exist (log lines
carry their trace id), but only record (attributes, events, timings) when
tracing is enabled, since a recorded span costs several times a bare one on
every call; they leave the process only when tracing is enabled:
`console` writes one JSON object per span to stdout, `otlp` sends them to
a collector over gRPC (needs the `otlp` extra: opentelemetry-exporter-otlp-proto-grpc).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any, Callable, ContextManager, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor,
                                            SpanExporter, SpanExportResult)
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.config import TracingConfig
from shared.errors import ConfigError
from shared.version import VERSION

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None


def _compact(span: ReadableSpan) -> str:
    return json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n"


class _Switchable(SpanProcessor, Sampler):
    """The exporter and sampler of the process, replaceable when the configuration is reloaded
    (OpenTelemetry allows one tracer provider per process)."""

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


_relay = _RelayExporter()
_relayed = False  # this process has no network: OTLP spans go through the frontend


def attach_relay(loop: asyncio.AbstractEventLoop, send: Callable[[bytes], None]) -> None:
    """Where a process without network hands its encoded spans (OTLP ExportTraceServiceRequest bytes)."""
    _relay.attach(loop, send)


def _processor(settings: TracingConfig) -> SpanProcessor | None:
    if not settings.enable_tracing:
        return None
    if settings.tracing_exporter == "console":
        return SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout, formatter=_compact))
    if _relayed:
        return BatchSpanProcessor(_relay)
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            "crio.tracing: the otlp exporter needs the package "
            "opentelemetry-exporter-otlp-proto-grpc (pip install 'crio-py[otlp]')") from None
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.tracing_endpoint, insecure=True))


def configure(service: str, settings: TracingConfig, *, relayed: bool | None = None) -> None:
    """Set up this process's tracing, or change its exporter and sampling after a reload.

    `relayed`: the process has no network, so OTLP spans are relayed by the frontend.
    """
    global _provider, _relayed
    if relayed is not None:
        _relayed = relayed
    rate = max(0, min(settings.tracing_sampling_rate_per_million, 1_000_000)) / 1_000_000
    old = _switch.processor
    _switch.processor = _processor(settings)
    _switch.sampler = ParentBased(TraceIdRatioBased(rate))
    if old is not None:
        old.shutdown()
    if _provider is None:
        _provider = TracerProvider(
            resource=Resource.create({"service.name": f"criopy-{service}", "service.version": VERSION}),
            sampler=_switch)
        _provider.add_span_processor(_switch)
        trace.set_tracer_provider(_provider)


_tracers: dict[str, trace.Tracer] = {}


def tracer(name: str = "criopy") -> trace.Tracer:
    # Looked up once per name: get_tracer builds a new tracer on every call. One made before
    # `configure` is OpenTelemetry's proxy, which follows the provider once it is set.
    found = _tracers.get(name)
    if found is None:
        found = _tracers[name] = trace.get_tracer(name)
    return found


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def untraced() -> ContextManager[Any]:
    """A scope for work done beside the requests (health probes, the read model's snapshots): its
    spans, and those of the daemons it calls, are never sampled, so they do not flood the exporter."""
    parent = trace.SpanContext(trace_id=random.getrandbits(128) or 1, span_id=random.getrandbits(64) or 1,
                               is_remote=False, trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT))
    return trace.use_span(trace.NonRecordingSpan(parent), end_on_exit=False)


def context_from_traceparent(traceparent: str | None) -> Any:
    """The OpenTelemetry context to continue a caller's trace (empty if none)."""
    if not traceparent:
        return otel_context.Context()
    return _propagator.extract({"traceparent": traceparent})


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()
