"""CRI-O's metric families: their labels and values, and how the merged page carries them; and
metrics off, which load nothing of prometheus_client."""

from __future__ import annotations

import math
import subprocess
import sys

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.frontend.metrics_endpoint import merge
from shared import metric_families, metrics

metrics.enable()  # as a service whose configuration turns metrics on


def test_size_classes_are_crio_s() -> None:
    assert metrics.size_bucket(0) == ">0 B"
    assert metrics.size_bucket(1000) == ">0 B"  # CRI-O's thresholds are exceeded, not reached
    assert metrics.size_bucket(1001) == ">1 KiB"
    assert metrics.size_bucket(2_500_000) == ">1 MiB"
    assert metrics.size_bucket(450e6) == ">400 MiB"
    assert metrics.size_bucket(20e9) == ">10 GiB"


def test_pull_failure_reasons_from_crio_py_s_messages() -> None:
    where = "pulling image 127.0.0.1:5000/timeout-manifest-layer:v1 from registry 127.0.0.1:5000"
    reason = metrics.image_pull_failure_reason
    assert reason("NOT_FOUND", f"{where}: manifest v1 not found (HTTP 404)") == "MANIFEST_UNKNOWN"
    assert reason("NOT_FOUND", f"{where}: layer sha256:ab not found (HTTP 404)") == "BLOB_UNKNOWN"
    assert reason("UNAUTHENTICATED", f"{where}: manifest v1: authentication is required (HTTP 401)") == \
        "UNAUTHORIZED"
    assert reason("PERMISSION_DENIED", f"{where}: manifest v1: access denied (HTTP 403)") == "DENIED"
    assert reason("UNAVAILABLE", f"{where}: manifest v1: ConnectError: [Errno 111] Connection refused") == \
        "CONNECTION_REFUSED"
    assert reason("UNAVAILABLE", f"{where}: manifest v1: ConnectTimeout: timed out") == "CONNECTION_TIMEOUT"
    assert reason("UNAVAILABLE", f"{where}: manifest v1: registry kept failing (HTTP 429: x)") == "TOOMANYREQUESTS"
    # The image's name (here full of those words) never decides the label.
    assert reason("DATA_LOSS", f"{where}: layer sha256:ab: content digest does not match") == "UNKNOWN"


def test_latency_summary_has_crio_s_quantiles_over_a_window() -> None:
    summary = metric_families._WindowSummary("s_seconds_total", "help", "operation", (0.5, 0.9, 0.99), keep=100)
    for ms in range(1, 101):
        summary.observe("Version", ms / 1000)
    samples = {(s.name, s.labels.get("quantile")): s.value for s in summary.collect()[0].samples}
    assert samples[("s_seconds_total", "0.5")] == 0.05
    assert samples[("s_seconds_total", "0.9")] == 0.09
    assert samples[("s_seconds_total", "0.99")] == 0.099
    assert samples[("s_seconds_total_count", None)] == 100
    assert math.isclose(samples[("s_seconds_total_sum", None)], 5.05)
    # Old observations leave the quantiles, not the count and sum.
    summary.max_age = 0
    samples = {(s.name, s.labels.get("quantile")): s.value for s in summary.collect()[0].samples}
    assert math.isnan(samples[("s_seconds_total", "0.5")]) and samples[("s_seconds_total_count", None)] == 100


def _page(owner_value: float, own_value: float) -> str:
    registry = CollectorRegistry()
    Counter("container_runtime_crio_containers_oom_total", "OOM", registry=registry).inc(owner_value)
    Counter("criopy_things_total", "things", registry=registry).inc(own_value)
    return generate_latest(registry).decode()


def test_merged_page_takes_crio_families_from_their_owner_without_a_service_label() -> None:
    assert metrics.CRIO_OWNERS["container_runtime_crio_containers_oom"] == "runtimed"
    families = merge({"frontend": _page(0, 1), "runtimed": _page(3, 2), "imaged": _page(0, 4)})
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    assert samples == {
        ("container_runtime_crio_containers_oom_total", ()): 3,
        ("criopy_things_total", (("service", "frontend"),)): 1,
        ("criopy_things_total", (("service", "runtimed"),)): 2,
        ("criopy_things_total", (("service", "imaged"),)): 4,
    }
    # One family each on the page served.
    text = generate_latest(_registry(families)).decode()
    assert sorted(f.name for f in text_string_to_metric_families(text)) == [
        "container_runtime_crio_containers_oom", "criopy_things"]


def _registry(families: list) -> CollectorRegistry:
    class Static:
        def collect(self):  # type: ignore[no-untyped-def]
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Static())  # type: ignore[arg-type]
    return registry


def test_metrics_off_load_no_prometheus_and_count_from_when_they_are_turned_on() -> None:
    # A fresh interpreter: this one turned metrics on above.
    script = """
import sys
from shared import daemon, metrics
from services.frontend import service
import services.runtimed.service, services.imaged.service, services.netd.service, services.storaged.service
assert "prometheus_client" not in sys.modules, "loaded with metrics off"
metrics.observe_operation("Version", "OK", 0.001)
metrics.container_oom_killed("c")
assert metrics.exposition() == ""
metrics.enable()
metrics.observe_operation("Version", "OK", 0.001)
page = metrics.exposition()
assert 'criopy_operations_total{code="OK",operation="Version"} 1.0' in page, page
assert "criopy_containers_oom_total 0.0" in page, page
assert metrics.CRIO_OWNERS["container_runtime_crio_containers_oom"] == "runtimed"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_family_replaces_its_stand_in_when_metrics_are_on() -> None:
    from prometheus_client import Counter, Gauge, Histogram

    families = {name: value for name, value in vars(metric_families).items()
                if isinstance(value, (Counter, Gauge, Histogram, metric_families._WindowSummary))}
    assert families and all(getattr(metrics, name) is family for name, family in families.items())
    assert [name for name, value in vars(metrics).items() if value is metrics._OFF and not name.startswith("_")] == []
