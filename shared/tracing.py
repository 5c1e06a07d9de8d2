"""OpenTelemetry tracing: one tracer provider per process, context in the bus envelope.

The frontend opens a span per CRI call; the bus client injects its W3C
`traceparent` into each request and the daemon continues the trace from it,
so one CRI call is one trace across processes. Spans always exist (log lines
carry their trace id), but only record (attributes, events, timings) when
tracing is enabled, since a recorded span costs several times a bare one on
every call; they leave the process only when tracing is enabled (see
tracing_sdk.py: `console` or `otlp`). With tracing off, spans are made here,
with their ids and nothing more, and the OpenTelemetry SDK is not even
imported: every process would hold it for nothing.
"""

from __future__ import annotations

import asyncio
import random
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.config import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkProvider

_propagator = TraceContextTextMapPropagator()


class _Tracer(trace.Tracer):
    """A tracer that records through the SDK when tracing is on, and makes bare spans otherwise."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._recording: trace.Tracer | None = None
        self._of: Any = None  # the SDK provider `_recording` comes from

    def _sdk(self) -> trace.Tracer | None:
        if _sdk_provider is None:
            return None
        if self._of is not _sdk_provider:
            self._recording, self._of = _sdk_provider.get_tracer(self.name), _sdk_provider
        return self._recording

    def start_span(self, name: str, context: otel_context.Context | None = None,
                   kind: trace.SpanKind = trace.SpanKind.INTERNAL, *args: Any, **kwargs: Any) -> trace.Span:
        recording = self._sdk()
        if recording is not None:
            return recording.start_span(name, context, kind, *args, **kwargs)
        parent = trace.get_current_span(context).get_span_context()
        trace_id = parent.trace_id if parent.is_valid else random.getrandbits(128) or 1
        # Ids as the SDK makes them (random's generator, reseeded in a forked process); never 0, the invalid id.
        return trace.NonRecordingSpan(trace.SpanContext(
            trace_id=trace_id, span_id=random.getrandbits(64) or 1, is_remote=False,
            trace_flags=parent.trace_flags if parent.is_valid else trace.TraceFlags(trace.TraceFlags.DEFAULT)))

    @contextmanager  # type: ignore[override]
    def start_as_current_span(self, name: str, context: otel_context.Context | None = None,
                              kind: trace.SpanKind = trace.SpanKind.INTERNAL, attributes: Any = None,
                              links: Any = None, start_time: int | None = None, record_exception: bool = True,
                              set_status_on_exception: bool = True, end_on_exit: bool = True) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time, record_exception,
                               set_status_on_exception)
        with trace.use_span(span, end_on_exit=end_on_exit, record_exception=record_exception,
                            set_status_on_exception=set_status_on_exception) as current:
            yield current


class _Provider(trace.TracerProvider):
    def get_tracer(self, instrumenting_module_name: str, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _Tracer(instrumenting_module_name)


_provider: _Provider | None = None
# The SDK's provider, once tracing was enabled in this process (kept when it is turned off again:
# its exporter is then none, and spans only carry ids).
_sdk_provider: SdkProvider | None = None
_relayed = False  # this process has no network: OTLP spans go through the frontend
_relay_target: tuple[asyncio.AbstractEventLoop, Callable[[bytes], None]] | None = None


def attach_relay(loop: asyncio.AbstractEventLoop, send: Callable[[bytes], None]) -> None:
    """Where a process without network hands its encoded spans (OTLP ExportTraceServiceRequest bytes)."""
    global _relay_target
    _relay_target = (loop, send)
    if _sdk_provider is not None:
        from shared import tracing_sdk

        tracing_sdk.relay.attach(loop, send)



def configure(service: str, settings: TracingConfig, *, relayed: bool | None = None) -> None:
    """Set up this process's tracing, or change its exporter and sampling after a reload.

    `relayed`: the process has no network, so OTLP spans are relayed by the frontend.
    """
    global _provider, _sdk_provider, _relayed
    if relayed is not None:
        _relayed = relayed
    if _provider is None:
        _provider = _Provider()
        trace.set_tracer_provider(_provider)
    if settings.enable_tracing or _sdk_provider is not None:
        from shared import tracing_sdk

        _sdk_provider = tracing_sdk.provider(service, settings, relayed=_relayed, current=_sdk_provider)
        if _relay_target is not None:
            tracing_sdk.relay.attach(*_relay_target)


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
    if _sdk_provider is not None:
        _sdk_provider.shutdown()
