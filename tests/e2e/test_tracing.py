"""Traces reach an OTLP collector as one trace per CRI call, across processes."""

from __future__ import annotations

from typing import Iterator

import pytest
from cri_api.v1 import api_pb2

from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.stack import Dirs, Stack, start_stack

pytestmark = pytest.mark.root


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    yield r
    r.stop()


@pytest.fixture
def traced(dirs: Dirs, receiver: OtlpReceiver) -> Iterator[Stack]:
    (dirs.cni / "10-test.conflist").write_text('{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"loopback"}]}')
    s = start_stack(dirs, "--set", "crio.tracing.enable_tracing=true",
                    "--set", 'crio.tracing.tracing_exporter="otlp"',
                    "--set", f'crio.tracing.tracing_endpoint="{receiver.endpoint}"')
    try:
        yield s
    finally:
        s.stop()


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_id == parent.span_id]


def test_status_is_one_trace_over_frontend_runtimed_and_netd(traced: Stack, receiver: OtlpReceiver) -> None:
    traced.runtime.Status(api_pb2.StatusRequest(), timeout=5)
    name = "/runtime.v1.RuntimeService/Status"
    assert receiver.wait_for(lambda spans: len({s.service for s in receiver.trace_of(name)}) >= 3)
    spans = receiver.trace_of(name)
    root = next(s for s in spans if s.name == name)
    assert root.service == "criopy-frontend"
    bus_calls = {s.name: s for s in children(spans, root)}
    assert {"bus runtimed.health", "bus netd.health"} <= set(bus_calls)
    for daemon in ("runtimed", "netd"):
        served = children(spans, bus_calls[f"bus {daemon}.health"])
        assert [(s.service, s.name) for s in served] == [(f"criopy-{daemon}", f"{daemon}/health")]
        assert served[0].attributes["rpc.service"] == daemon
