"""Spans: ids on every log line whether tracing is on or off; recorded and exported only when it is on."""

from __future__ import annotations

import json
import logging
from typing import Iterator

import pytest
import structlog
from opentelemetry import trace

from shared import log as logs
from shared import tracing
from shared.config import TracingConfig

CONSOLE = TracingConfig(enable_tracing=True, tracing_exporter="console")


@pytest.fixture(autouse=True)
def restored_logs_and_tracing() -> Iterator[None]:
    """logs.configure points structlog and the root logger at this test's captured stderr: undo it."""
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    service, debug = logs._service, logs._debug
    yield
    tracing.configure("test", TracingConfig())
    structlog.configure(**structlog_config)
    root.handlers[:], root.level = handlers, level
    logs._service, logs._debug = service, debug


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_with_tracing_off_spans_record_nothing_but_log_lines_carry_their_ids(
        capsys: pytest.CaptureFixture[str]) -> None:
    tracing.configure("test", TracingConfig())
    logs.configure("test", "info", "json")
    with tracing.tracer(__name__).start_as_current_span("call", attributes={"rpc.method": "m"}) as span:
        with logs.bind_request("r-1", cri_method="RuntimeService/Version"):
            logs.get_logger(__name__).info("inside")
        traceparent = tracing.current_traceparent()
        recording = span.is_recording()
    context = span.get_span_context()
    assert not recording
    assert context.is_valid
    assert traceparent is not None and format(context.trace_id, "032x") in traceparent
    captured = capsys.readouterr()
    [line] = [entry for entry in _lines(captured.err) if entry["event"] == "inside"]
    assert line["trace_id"] == format(context.trace_id, "032x")
    assert line["span_id"] == format(context.span_id, "016x")
    assert line["request_id"] == "r-1" and line["cri_method"] == "RuntimeService/Version"
    assert _lines(captured.out) == []  # nothing exported


def test_request_fields_are_unbound_after_the_block_and_outer_ones_restored(
        capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("test", "info", "json")
    log = logs.get_logger(__name__)
    with logs.bind_request("outer", method="a"):
        with logs.bind_request("inner", method="b"):
            log.info("nested")
        log.info("after_inner")
    log.info("after_outer")
    lines = {entry["event"]: entry for entry in _lines(capsys.readouterr().err)}
    assert (lines["nested"]["request_id"], lines["nested"]["method"]) == ("inner", "b")
    assert (lines["after_inner"]["request_id"], lines["after_inner"]["method"]) == ("outer", "a")
    assert "request_id" not in lines["after_outer"] and "method" not in lines["after_outer"]


def test_debug_lines_follow_the_configured_level(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("test", "debug", "json")
    assert logs.debug_enabled()
    logs.configure("test", "info", "json")
    assert not logs.debug_enabled()


def test_with_tracing_on_spans_are_recorded_and_exported(capsys: pytest.CaptureFixture[str]) -> None:
    tracing.configure("test", CONSOLE)
    with tracing.tracer(__name__).start_as_current_span(
            "call", kind=trace.SpanKind.SERVER, attributes={"rpc.method": "m"}) as span:
        assert span.is_recording()
        with tracing.tracer(__name__).start_as_current_span("child") as child:
            pass
    spans = {s["name"]: s for s in _lines(capsys.readouterr().out)}
    assert spans["call"]["attributes"] == {"rpc.method": "m"}
    assert spans["child"]["parent_id"] == spans["call"]["context"]["span_id"]
    assert spans["child"]["context"]["trace_id"] == format(child.get_span_context().trace_id, "#034x")


def test_a_remote_parent_continues_its_trace_whether_recorded_or_not() -> None:
    parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    for settings in (TracingConfig(), CONSOLE):
        tracing.configure("test", settings)
        with tracing.tracer(__name__).start_as_current_span(
                "served", context=tracing.context_from_traceparent(parent)) as span:
            assert format(span.get_span_context().trace_id, "032x") == "ab" * 16
            assert span.is_recording() is settings.enable_tracing


def test_the_sdk_is_loaded_only_once_tracing_is_enabled() -> None:
    import subprocess
    import sys

    from tests.support.stack import REPO

    script = (
        "import sys\n"
        "from shared import daemon, tracing\n"
        "from shared.config import TracingConfig\n"
        "tracing.configure('test', TracingConfig())\n"
        "with tracing.tracer('t').start_as_current_span('s'):\n"
        "    assert tracing.current_traceparent()\n"
        "print(any(m.startswith('opentelemetry.sdk') for m in sys.modules))\n"
        "tracing.configure('test', TracingConfig(enable_tracing=True, tracing_exporter='console'))\n"
        "print(any(m.startswith('opentelemetry.sdk') for m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "True"], result.stderr
