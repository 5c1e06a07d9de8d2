"""OpenTelemetry tracing: one tracer provider per process, context in the bus envelope.

The frontend opens a span per CRI call; the bus client injects its W3C
`traceparent` into each request and the daemon continues the trace from it,
so one CRI call is one trace across processes. Spans always exist (log lines
carry their trace id); they leave the process only when tracing is enabled:
`console` writes one JSON object per span to stdout, `otlp` sends them to
a collector over gRPC (needs the `otlp` extra: opentelemetry-exporter-otlp-proto-grpc).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, SamplingResult, TraceIdRatioBased
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
        return self.sampler.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return f"criopy({self.sampler.get_description()})"


_switch = _Switchable()


def _processor(settings: TracingConfig) -> SpanProcessor | None:
    if not settings.enable_tracing:
        return None
    if settings.tracing_exporter == "console":
        return SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout, formatter=_compact))
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            "crio.tracing: the otlp exporter needs the package "
            "opentelemetry-exporter-otlp-proto-grpc (pip install 'crio-py[otlp]')") from None
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.tracing_endpoint, insecure=True))


def configure(service: str, settings: TracingConfig) -> None:
    """Set up this process's tracing, or change its exporter and sampling after a reload."""
    global _provider
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


def tracer(name: str = "criopy") -> trace.Tracer:
    return trace.get_tracer(name)


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def context_from_traceparent(traceparent: str | None) -> Any:
    """The OpenTelemetry context to continue a caller's trace (empty if none)."""
    if not traceparent:
        return otel_context.Context()
    return _propagator.extract({"traceparent": traceparent})


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()
