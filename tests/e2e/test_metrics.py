"""One Prometheus endpoint covers all five processes."""

from __future__ import annotations

import os
import signal
import socket
from typing import Iterator

import httpx
import pytest
from cri_api.v1 import api_pb2
from prometheus_client.parser import text_string_to_metric_families

from shared.services import START_ORDER
from tests.support.stack import Dirs, Stack, start_stack

pytestmark = pytest.mark.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def metered(dirs: Dirs) -> Iterator[tuple[Stack, int]]:
    port = free_port()
    (dirs.cni / "10-test.conflist").write_text('{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"loopback"}]}')
    s = start_stack(dirs, "--set", "crio.metrics.enable_metrics=true", "--set", f"crio.metrics.metrics_port={port}")
    try:
        yield s, port
    finally:
        s.stop()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_of_every_process_on_one_endpoint(metered: tuple[Stack, int]) -> None:
    stack, port = metered
    stack.runtime.Version(api_pb2.VersionRequest(), timeout=5)
    stack.runtime.Status(api_pb2.StatusRequest(), timeout=5)
    samples = scrape(port)
    for name in START_ORDER:
        assert value(samples, "criopy_service_up", service=name) == 1, name
        assert value(samples, "process_resident_memory_bytes", service=name) > 0, name
        assert value(samples, "process_cpu_seconds_total", service=name) is not None, name
        assert value(samples, "criopy_service_restarts_total", service=name) == 0, name
    assert value(samples, "criopy_operations_total", operation="Version", code="OK", service="frontend") >= 1
    assert value(samples, "criopy_operations_latency_seconds_count", operation="Status", service="frontend") >= 1
    assert value(samples, "criopy_bus_calls_total", daemon="runtimed", method="health",
                 outcome="OK", service="frontend") >= 1


def test_failed_operations_are_counted_by_code(metered: tuple[Stack, int]) -> None:
    stack, port = metered
    with pytest.raises(Exception):
        stack.runtime.CheckpointContainer(api_pb2.CheckpointContainerRequest(container_id="x", location="/tmp/x.tar"),
                                          timeout=5)
    samples = scrape(port)
    assert value(samples, "criopy_operations_total", operation="CheckpointContainer",
                 code="NOT_FOUND", service="frontend") == 1


def test_a_daemon_that_does_not_answer_is_reported_down(metered: tuple[Stack, int]) -> None:
    stack, port = metered
    pid = stack.pid("storaged")
    os.kill(pid, signal.SIGSTOP)
    try:
        samples = scrape(port)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert value(samples, "criopy_service_up", service="storaged") == 0
    assert value(samples, "criopy_service_up", service="imaged") == 1


def test_only_metrics_path_is_served(metered: tuple[Stack, int]) -> None:
    _stack, port = metered
    assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=5).status_code == 404
    assert httpx.post(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 405
