"""One Prometheus endpoint covers all five processes, with CRI-O's families as CRI-O names them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Iterator

import grpc
import httpx
import pytest
from cri_api.v1 import api_pb2
from prometheus_client.parser import text_string_to_metric_families

from shared.services import START_ORDER
from tests.support import images
from tests.support.pods import busybox_registry, remove_pods
from tests.support.registry import launch_registry
from tests.support.stack import Dirs, Stack, short_tempdir, start_stack

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


def value(samples: dict, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


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


# -- CRI-O's families, read by a real Prometheus -------------------------------------

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
CRIO_SIZE_BUCKETS = {">10 GiB", ">1 GiB", ">500 MiB", ">400 MiB", ">300 MiB", ">200 MiB", ">100 MiB", ">50 MiB",
                     ">10 MiB", ">1 MiB", ">1 KiB", ">0 B"}


@dataclass
class Scraped:
    stack: Stack
    metrics_port: int
    prometheus: str  # its HTTP API's base URL
    image: images.Pushed

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]


@pytest.fixture
def scraped(dirs: Dirs) -> Iterator[Scraped]:
    """crio-py with metrics on, a registry with busybox, and Prometheus scraping crio-py every second."""
    work = short_tempdir("prom-")
    registry = launch_registry(work / "registry")
    stack = prometheus = None
    try:
        pushed = images.push_busybox_image(registry, "metrics/busybox", "latest")
        port = free_port()
        (dirs.cni / "10-test.conflist").write_text(
            '{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"loopback"}]}')
        stack = start_stack(dirs, "--set", "crio.metrics.enable_metrics=true",
                            "--set", f"crio.metrics.metrics_port={port}",
                            "--set", f'crio.image.insecure_registries=["{registry.host}"]')
        web = free_port()
        config = work / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            f"scrape_configs:\n  - job_name: crio\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
        with open(work / "prometheus.log", "wb") as log:
            prometheus = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{web}"
        deadline = time.time() + 60
        while True:
            assert prometheus.poll() is None, (work / "prometheus.log").read_text()
            try:
                if httpx.get(f"{base}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)
        yield Scraped(stack, port, base, pushed)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(timeout=30)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
        if stack is not None:
            stack.stop()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


def _wait_series(scraped: Scraped, promql: str, timeout: float = 30) -> list[dict]:
    """The series `promql` selects, once a scrape has brought them in."""
    deadline = time.time() + timeout
    while True:
        found = scraped.query(promql)
        if found or time.time() > deadline:
            return found
        time.sleep(0.5)


def test_crio_families_are_scraped_by_prometheus_with_crio_labels(scraped: Scraped) -> None:
    stack, image = scraped.stack, scraped.image
    stack.runtime.Version(api_pb2.VersionRequest(), timeout=5)
    with pytest.raises(grpc.RpcError):
        stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id="nope"), timeout=5)
    pull = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image.ref))
    stack.images.PullImage(pull, timeout=60)
    stack.images.PullImage(pull, timeout=60)  # every blob is in the store: layers reused
    with pytest.raises(grpc.RpcError):
        stack.images.PullImage(api_pb2.PullImageRequest(
            image=api_pb2.ImageSpec(image=f"{image.name}:no-such-tag")), timeout=60)

    job = {"instance": f"127.0.0.1:{scraped.metrics_port}", "job": "crio"}
    # Wait for a scrape that saw the last call end (its error is the last thing counted).
    assert _wait_series(scraped, 'container_runtime_crio_operations_errors_total{operation="PullImage"}')

    def series(family: str, *labels: str) -> dict[tuple, float]:
        """{label set: value} of a family's series, checking that its labels are CRI-O's and nothing else."""
        found = scraped.query(family)
        out = {}
        for s in found:
            metric = dict(s["metric"])
            assert metric.pop("__name__") == family
            assert {k: metric.pop(k) for k in job} == job, s
            assert set(metric) == set(labels), (family, s["metric"])  # no `service` label
            out[tuple(sorted(metric.items()))] = float(s["value"][1])
        assert len(out) == len(found)
        return out

    operations = series("container_runtime_crio_operations_total", "operation")
    assert operations[(("operation", "Version"),)] >= 1
    assert operations[(("operation", "PullImage"),)] == 3
    errors = series("container_runtime_crio_operations_errors_total", "operation")
    assert errors[(("operation", "ContainerStatus"),)] == 1 and errors[(("operation", "PullImage"),)] == 1
    assert (("operation", "Version"),) not in errors
    assert (("operation", "PullImage"),) in series("container_runtime_crio_operations_latency_seconds", "operation")
    quantiles = series("container_runtime_crio_operations_latency_seconds_total", "operation", "quantile")
    assert {dict(k)["quantile"] for k in quantiles} == {"0.5", "0.9", "0.99"}
    assert series("container_runtime_crio_operations_latency_seconds_total_count",
                  "operation")[(("operation", "PullImage"),)] == 3

    assert series("container_runtime_crio_image_pulls_success_total") == {(): 2}
    assert series("container_runtime_crio_image_pulls_failure_total", "error") == {(("error", "MANIFEST_UNKNOWN"),): 1}
    downloaded = series("container_runtime_crio_image_pulls_bytes_total", "mediatype", "size")
    by_type = {dict(k)["mediatype"]: v for k, v in downloaded.items()}
    layer_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    assert by_type[layer_type] == image.size - len(images.Image([images.busybox_layer()]).config_bytes())
    assert {dict(k)["size"] for k in downloaded} <= CRIO_SIZE_BUCKETS
    # The config and the layer, each downloaded once.
    assert series("container_runtime_crio_image_pulls_layer_size_count") == {(): 2}
    assert series("container_runtime_crio_image_pulls_layer_size_bucket", "le")[(("le", "+Inf"),)] == 2
    reused = series("container_runtime_crio_image_layer_reuse_total", "name")
    assert reused == {(("name", f"{image.ref}@{image.layer_digests[0]}"),): 1}
    skipped = series("container_runtime_crio_image_pulls_skipped_bytes_total", "size")
    assert sum(skipped.values()) == by_type[layer_type] and {dict(k)["size"] for k in skipped} <= CRIO_SIZE_BUCKETS

    assert series("container_runtime_crio_containers_oom_total") == {(): 0}
    assert series("container_runtime_crio_containers_events_dropped_total") == {(): 0}
    assert list(series("container_runtime_crio_processes_defunct")) == [()]

    # crio-py's own families are still there, by service.
    assert scraped.query('criopy_service_up{service="storaged"}')[0]["value"][1] == "1"


def test_the_page_passes_promtool(metered: tuple[Stack, int]) -> None:
    stack, port = metered
    stack.runtime.Version(api_pb2.VersionRequest(), timeout=5)
    page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=page, capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    # CRI-O names its summary of latencies `..._seconds_total`, which the linter dislikes; that name is
    # kept for CRI-O's dashboards. Anything else is a real problem.
    allowed = {'container_runtime_crio_operations_latency_seconds_total non-counter metrics should not have '
               '"_total" suffix'}
    assert set(problems) <= allowed, result
    assert result.returncode == (3 if problems else 0), result  # 3: lint problems only, no format error


def test_monitor_deaths_and_stalled_creations_are_counted(dirs: Dirs) -> None:
    """CRI-O's containers_stopped_monitor_count and resources_stalled_at_stage."""
    port = free_port()
    # A CNI plugin that takes its time on ADD, so a pod's creation outlives the caller's deadline.
    plugins = dirs.base / "plugins"
    plugins.mkdir()
    slow = plugins / "slowloopback"
    slow.write_text('#!/bin/sh\n[ "$CNI_COMMAND" = ADD ] && sleep 4\nexec /usr/lib/cni/loopback\n')
    slow.chmod(0o755)
    (dirs.cni / "10-slow.conflist").write_text(
        '{"cniVersion":"1.0.0","name":"slow","plugins":[{"type":"slowloopback"}]}')
    with busybox_registry(dirs.base / "registry", "metrics/busybox") as (registry, image):
        stack = start_stack(dirs, "--set", "crio.metrics.enable_metrics=true",
                            "--set", f"crio.metrics.metrics_port={port}",
                            "--set", f'crio.network.plugin_dirs=["{plugins}", "/usr/lib/cni"]',
                            "--set", f'crio.image.insecure_registries=["{registry.host}"]')
        try:
            pod = api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name="slow", namespace="m", uid="u1"))
            for _ in range(2):  # the first request times out; its retry finds it still at CNI ADD
                with pytest.raises(grpc.RpcError) as err:
                    stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=1)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            pod_id = stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=60).pod_sandbox_id
            stalled = value(scrape(port), "container_runtime_crio_resources_stalled_at_stage_total",
                            stage="sandbox network creation")
            assert stalled is not None and stalled >= 1
            # A container whose conmon is killed under it.
            stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=60)
            cid = stack.runtime.CreateContainer(api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id, sandbox_config=pod, config=api_pb2.ContainerConfig(
                    metadata=api_pb2.ContainerMetadata(name="watched"), image=api_pb2.ImageSpec(image=image),
                    command=["sleep", "600"])), timeout=60).container_id
            stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
            info = stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid, verbose=True),
                                                 timeout=10).info["info"]
            os.kill(json.loads(info)["conmonPid"], signal.SIGKILL)
            name = "k8s_watched_slow_m_u1_0"
            deadline = time.time() + 20
            while value(scrape(port), "container_runtime_crio_containers_stopped_monitor_count_total",
                        name=name) != 1 and time.time() < deadline:
                time.sleep(0.5)
            assert value(scrape(port), "container_runtime_crio_containers_stopped_monitor_count_total",
                         name=name) == 1
            stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
            assert stack.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers == []
        finally:
            try:
                remove_pods(stack)  # whatever a failure above left running
            finally:
                stack.stop()
