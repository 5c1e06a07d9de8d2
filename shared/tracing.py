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
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.config import TracingConfig
from shared.errors import ConfigError
from shared.version import VERSION

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None


def _compact(span: ReadableSpan) -> str:
    return json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n"


def configure(service: str, settings: TracingConfig) -> None:
    global _provider
    rate = max(0, min(settings.tracing_sampling_rate_per_million, 1_000_000)) / 1_000_000
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"criopy-{service}", "service.version": VERSION}),
        sampler=ParentBased(TraceIdRatioBased(rate)),
    )
    if settings.enable_tracing:
        if settings.tracing_exporter == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout, formatter=_compact)))
        else:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise ConfigError(
                    "crio.tracing: the otlp exporter needs the package "
                    "opentelemetry-exporter-otlp-proto-grpc (pip install 'crio-py[otlp]')") from None
            provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=settings.tracing_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    _provider = provider


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
