"""Structured logs: one JSON object per line on stderr, in every process.

Every line carries the service name, and the request id and trace id of the
call being served when there is one (`bind_request`), so one CRI call can be
followed through all five processes. On a terminal the lines are rendered for
people instead.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, ContextManager

import structlog
from opentelemetry import trace

_service = "criopy"
_debug = True  # until `configure`: structlog's default logger writes every level

_LEVELS = {
    "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
    "error": logging.ERROR, "fatal": logging.CRITICAL, "panic": logging.CRITICAL,
}


def _add_service(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    event.setdefault("service", _service)
    return event


def _add_trace(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def configure(service: str, level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog (and the stdlib logging of libraries) for this process."""
    global _service, _debug
    _service = service
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer(colors=False) if console else structlog.processors.JSONRenderer()
    shared_processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_service,
        _add_trace,
    ]
    numeric = _LEVELS.get(level.lower(), logging.INFO)
    _debug = numeric <= logging.DEBUG
    structlog.configure(
        processors=[*shared_processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (grpc, httpx, asyncio) log through the standard library: same format.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_processors,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO) if numeric > logging.DEBUG else logging.DEBUG)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Bound:
    """Fields bound for the length of a block, then put back as they were (a context manager)."""

    __slots__ = ("_fields", "_tokens")

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields

    def __enter__(self) -> None:
        self._tokens = structlog.contextvars.bind_contextvars(**self._fields)

    def __exit__(self, *_exc: object) -> None:
        structlog.contextvars.reset_contextvars(**self._tokens)


def bind_request(request_id: str, **fields: Any) -> ContextManager[None]:
    """Tag every line logged inside the block with the request id (and more fields).

    Served on every call: restoring the variables by their tokens avoids the copy of
    the whole context that `structlog.contextvars.bound_contextvars` makes."""
    return _Bound({"request_id": request_id, **fields})


def debug_enabled() -> bool:
    """Whether debug lines are written: a hot path skips building them (and the logger lookup) when not."""
    return _debug


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
