"""GetContainerEvents' fan-out over a real event socket: every client gets every event; a slow one is dropped."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from typing import Any

import pytest
import zmq.asyncio
from cri_api.v1 import api_pb2

from services.frontend import container_events, event_hub
from services.frontend.event_hub import EventHub
from services.frontend.subscription import Subscription
from shared import metrics
from shared.bus.events import EventPublisher
from shared.errors import ResourceExhausted
from tests.support.stack import root_as_frontend, short_tempdir

metrics.enable()  # the counts these tests read exist with metrics on


@dataclass
class _Daemons:
    events: Any


@dataclass
class _Call:
    daemons: Any


def _event(n: int, kind: str = "CONTAINER_STARTED_EVENT") -> dict[str, Any]:
    return {"type": kind, "container_id": f"c{n}", "created_at": 1000 + n, "kind": "container", "event": "started",
            "pod_sandbox_status": {"id": "pod", "state": "SANDBOX_READY", "metadata": {"name": "p"}},
            "containers_statuses": [{"id": f"c{n}", "state": "CONTAINER_RUNNING", "exit_code": 0}]}


@pytest.fixture
async def hub_and_publisher(monkeypatch):
    monkeypatch.setattr(event_hub, "CLIENT_QUEUE_SIZE", 5)
    base = short_tempdir("ev-")
    config = root_as_frontend()
    config.crio.runroot = str(base)
    config.bus_dir().mkdir(parents=True)
    context = zmq.asyncio.Context()
    publisher = EventPublisher(config.events_endpoint("runtimed"), context, config)
    publisher.bind()
    hub = EventHub()
    subscription = Subscription(config.events_endpoint("runtimed"), context,
                                {topic: hub.deliver for topic in event_hub.TOPICS})
    subscription.start()
    try:
        # Wait for the subscription to reach the publisher (a PUB drops what nobody hears yet).
        probe = hub.subscribe()
        while probe.empty():
            publisher.publish("container", {"type": None, "container_id": "probe"})
            await asyncio.sleep(0.02)
        hub.unsubscribe(probe)
        yield hub, publisher
    finally:
        await subscription.close()
        publisher.close()
        context.term()
        shutil.rmtree(base, ignore_errors=True)


def test_bus_event_becomes_a_cri_event():
    response = container_events.to_response(_event(1, "CONTAINER_STOPPED_EVENT"))
    assert response.container_event_type == api_pb2.ContainerEventType.CONTAINER_STOPPED_EVENT
    assert response.container_id == "c1" and response.created_at == 1001
    assert response.pod_sandbox_status.state == api_pb2.PodSandboxState.SANDBOX_READY
    assert response.containers_statuses[0].state == api_pb2.ContainerState.CONTAINER_RUNNING
    assert container_events.to_response({"type": None, "container_id": "x"}) is None  # e.g. oom


async def test_two_clients_get_every_event_and_a_slow_one_is_dropped(hub_and_publisher):
    hub, publisher = hub_and_publisher
    dropped = metrics.REGISTRY.get_sample_value("container_runtime_crio_containers_events_dropped_total")
    call = _Call(_Daemons(hub))
    fast = container_events.get_container_events(api_pb2.GetEventsRequest(), call)
    slow = container_events.get_container_events(api_pb2.GetEventsRequest(), call)
    fast2 = container_events.get_container_events(api_pb2.GetEventsRequest(), call)
    # Advancing a stream subscribes it; the first event then arrives for all three.
    firsts = [asyncio.ensure_future(agen.__anext__()) for agen in (fast, slow, fast2)]
    await asyncio.sleep(0.05)
    assert hub.client_count == 3
    publisher.publish("container", _event(0))
    got = await asyncio.wait_for(asyncio.gather(*firsts), 5)
    assert [r.container_id for r in got] == ["c0"] * 3

    seen: dict[str, list[str]] = {"fast": [], "fast2": []}

    async def drain(name: str, agen: Any) -> None:
        while len(seen[name]) < 29:
            seen[name].append((await agen.__anext__()).container_id)

    readers = [asyncio.ensure_future(drain("fast", fast)), asyncio.ensure_future(drain("fast2", fast2))]
    for n in range(1, 30):
        publisher.publish("container", _event(n))
        await asyncio.sleep(0.005)  # the fast readers keep up; `slow` reads nothing
    await asyncio.wait_for(asyncio.gather(*readers), 10)
    assert seen["fast"] == seen["fast2"] == [f"c{n}" for n in range(1, 30)]

    # The slow client gets what fit in its queue, then its stream ends with RESOURCE_EXHAUSTED.
    late = []
    with pytest.raises(ResourceExhausted, match="did not keep up"):
        while True:
            late.append((await asyncio.wait_for(slow.__anext__(), 5)).container_id)
    assert 0 < len(late) < event_hub.CLIENT_QUEUE_SIZE and all(c in seen["fast"] for c in late)
    assert hub.client_count == 2
    # Counted as CRI-O counts events it drops: the one that did not fit, and the one given up for the verdict.
    assert metrics.REGISTRY.get_sample_value("container_runtime_crio_containers_events_dropped_total") == dropped + 2
    await fast.aclose()
    await fast2.aclose()
    assert hub.client_count == 0
