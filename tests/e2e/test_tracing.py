"""Traces reach an OTLP collector as one trace per CRI call, across processes."""

from __future__ import annotations

import secrets
from typing import Iterator

import pytest
from cri_api.v1 import api_pb2

from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.pods import bridge_stack, busybox_registry
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
    # Verbose: it asks the daemons now (a plain Status answers from the read model's health probes).
    traced.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=5)
    name = "/runtime.v1.RuntimeService/Status"
    assert receiver.wait_for(lambda spans: {"criopy-frontend", "criopy-runtimed", "criopy-netd"}
                             <= {s.service for s in receiver.trace_of(name)})
    spans = receiver.trace_of(name)
    root = next(s for s in spans if s.name == name)
    assert root.service == "criopy-frontend"
    bus_calls = {s.name: s for s in children(spans, root)}
    assert {"bus runtimed.health", "bus netd.health"} <= set(bus_calls)
    for daemon in ("runtimed", "netd"):
        served = children(spans, bus_calls[f"bus {daemon}.health"])
        assert [(s.service, s.name) for s in served] == [(f"criopy-{daemon}", f"{daemon}/health")]
        assert served[0].attributes["rpc.service"] == daemon


# -- pulls, pods and containers: each one trace over every process it touches --------------

CGROUP_PARENT = f"/criopy-trace-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def pod_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, OtlpReceiver, str]]:
    receiver = OtlpReceiver().start()
    try:
        with busybox_registry(tmp_path_factory.mktemp("trace-registry"), "trace/busybox") as (registry, image), \
                bridge_stack("cpt-", CGROUP_PARENT, "--set", "crio.tracing.enable_tracing=true",
                             "--set", f'crio.tracing.tracing_endpoint="{receiver.endpoint}"',
                             registry=registry) as stack:
            yield stack, receiver, image
    finally:
        receiver.stop()


def one_trace(receiver: OtlpReceiver, root_name: str, services: set[str],
              names: frozenset[str] = frozenset()) -> list[ReceivedSpan]:
    """The spans of the newest trace rooted at `root_name`, once spans of every service arrived, and
    every span of `names` (a service exports in batches: one of its spans may come before another)."""

    def complete(_: object) -> bool:
        spans = receiver.trace_of(root_name)
        return services <= {s.service for s in spans} and names <= {s.name for s in spans}

    assert receiver.wait_for(complete), {(s.service, s.name) for s in receiver.trace_of(root_name)}
    spans = receiver.trace_of(root_name)
    # One trace: every span but the root has its parent in the same trace.
    ids = {s.span_id for s in spans}
    assert [s.name for s in spans if not s.parent_id] == [root_name]
    assert all(s.parent_id in ids for s in spans if s.parent_id)
    return spans


def ancestry(spans: list[ReceivedSpan], span: ReceivedSpan) -> list[str]:
    by_id = {s.span_id: s for s in spans}
    chain = []
    while span.parent_id:
        span = by_id[span.parent_id]
        chain.append(f"{span.service}:{span.name}")
    return chain


def named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def test_pull_image_is_one_trace_with_downloads_and_unpacks(pod_world) -> None:  # type: ignore[no-untyped-def]
    stack, receiver, image = pod_world
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=60)
    spans = one_trace(receiver, "/runtime.v1.ImageService/PullImage",
                      {"criopy-frontend", "criopy-imaged", "criopy-storaged"},
                      frozenset({"download layer", "unpack layer"}))
    downloads = named(spans, "download layer")
    assert downloads and all(d.service == "criopy-imaged" and d.attributes["criopy.blob.bytes"] > 0
                             for d in downloads)
    assert ancestry(spans, downloads[0])[:2] == ["criopy-imaged:imaged/pull", "criopy-frontend:bus imaged.pull"]
    unpacks = named(spans, "unpack layer")
    assert unpacks and ancestry(spans, unpacks[0])[:2] == ["criopy-storaged:storaged/unpack",
                                                           "criopy-frontend:bus storaged.unpack"]


def test_run_pod_and_create_container_are_traces_with_cni_conmon_and_runc(pod_world) -> None:  # type: ignore[no-untyped-def]
    stack, receiver, image = pod_world
    stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=60)
    pod = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="traced", namespace="e2e", uid=secrets.token_hex(8)),
        linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=f"{CGROUP_PARENT}/traced"))
    pod_id = stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod), timeout=60).pod_sandbox_id
    spans = one_trace(receiver, "/runtime.v1.RuntimeService/RunPodSandbox",
                      {"criopy-frontend", "criopy-runtimed", "criopy-netd"},
                      frozenset({"cni ADD bridge", "runtimed/create_sandbox"}))
    [bridge] = named(spans, "cni ADD bridge")
    assert bridge.service == "criopy-netd" and bridge.attributes["cni.container_id"] == pod_id
    assert "criopy-netd:netd/attach" in ancestry(spans, bridge)
    assert named(spans, "runtimed/create_sandbox")

    config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="c"),
                                     image=api_pb2.ImageSpec(image=image), command=["sleep", "60"])
    cid = stack.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod), timeout=60).container_id
    spans = one_trace(receiver, "/runtime.v1.RuntimeService/CreateContainer",
                      {"criopy-frontend", "criopy-imaged", "criopy-storaged", "criopy-runtimed"},
                      frozenset({"conmon create", "mount overlay"}))
    [conmon] = named(spans, "conmon create")
    assert conmon.attributes["criopy.container_id"] == cid
    assert ancestry(spans, conmon)[:2] == ["criopy-runtimed:runtimed/create_container",
                                           "criopy-frontend:bus runtimed.create_container"]
    assert named(spans, "mount overlay")[0].service == "criopy-storaged"

    stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
    spans = one_trace(receiver, "/runtime.v1.RuntimeService/StartContainer", {"criopy-frontend", "criopy-runtimed"},
                      frozenset({"exec fifo start"}))
    [started] = named(spans, "exec fifo start")
    assert started.service == "criopy-runtimed" and started.attributes["criopy.container_id"] == cid
