"""Events on the bus, and their fan-out to GetContainerEvents clients."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from services.frontend.event_hub import CLIENT_QUEUE_SIZE, TOPICS, EventHub, SlowClient
from services.frontend.subscription import Subscription
from shared.bus.events import EventPublisher, EventSubscriber
from tests.support.stack import root_as_frontend, short_tempdir


@pytest.fixture
def run_dir() -> AsyncIterator[Path]:
    base = short_tempdir("ev-")
    yield base
    for p in base.rglob("*"):
        if not p.is_dir():
            p.unlink()
    for p in sorted(base.rglob("*"), reverse=True):
        p.rmdir()
    base.rmdir()


async def wait_until_subscribed(publisher: EventPublisher, queue_or_sub, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """PUB/SUB joins asynchronously: publish probes until one arrives."""
    async def probe() -> None:
        while True:
            publisher.publish("probe", {})
            await asyncio.sleep(0.05)

    task = asyncio.create_task(probe())
    try:
        await asyncio.wait_for(queue_or_sub(), timeout)
    finally:
        task.cancel()


async def test_published_events_arrive_in_order(run_dir: Path) -> None:
    ctx = zmq.asyncio.Context.instance()
    endpoint = f"ipc://{run_dir}/runtimed-events.sock"
    publisher = EventPublisher(endpoint, ctx, root_as_frontend())
    publisher.bind()
    subscriber = EventSubscriber(endpoint, ctx, topics=("container", "probe"))
    events = subscriber.__aiter__()

    async def first_probe() -> None:
        while (await events.__anext__())[0] != "probe":
            pass

    await wait_until_subscribed(publisher, first_probe)
    for i in range(5):
        publisher.publish("container", {"id": f"c{i}", "event": "started"})
    received = []
    while len(received) < 5:
        topic, event = await asyncio.wait_for(events.__anext__(), 5)
        if topic == "container":
            received.append(event["id"])
    assert received == [f"c{i}" for i in range(5)]
    subscriber.close()
    publisher.close()


async def test_malformed_event_is_skipped(run_dir: Path) -> None:
    ctx = zmq.asyncio.Context.instance()
    endpoint = f"ipc://{run_dir}/x-events.sock"
    raw = ctx.socket(zmq.PUB)
    raw.bind(endpoint)
    subscriber = EventSubscriber(endpoint, ctx)
    events = subscriber.__aiter__()
    import msgpack

    async def keep_sending() -> None:
        while True:
            await raw.send_multipart([b"t", b"\xc1garbage"])
            await raw.send_multipart([b"t", msgpack.packb({"v": 1, "topic": "t", "event": {"ok": True}})])
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(keep_sending())
    try:
        topic, event = await asyncio.wait_for(events.__anext__(), 5)
    finally:
        sender.cancel()
    assert (topic, event) == ("t", {"ok": True})
    subscriber.close()
    raw.close(linger=0)


async def test_hub_drops_a_client_that_does_not_keep_up(run_dir: Path) -> None:
    config = root_as_frontend()
    config.criopy.bus.socket_dir = str(run_dir)
    ctx = zmq.asyncio.Context.instance()
    publisher = EventPublisher(config.events_endpoint("runtimed"), ctx, config)
    publisher.bind()
    hub = EventHub()
    subscription = Subscription(config.events_endpoint("runtimed"), ctx,
                                {topic: hub.deliver for topic in (*TOPICS, "probe")})
    subscription.start()
    fast = hub.subscribe()
    slow = hub.subscribe()

    async def fast_got_probe() -> None:
        while (await fast.get())["topic"] != "probe":
            pass

    await wait_until_subscribed(publisher, fast_got_probe)
    drained = asyncio.create_task(_drain(fast))
    for i in range(CLIENT_QUEUE_SIZE * 2):
        publisher.publish("container", {"n": i})
        if i % 100 == 0:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)
    items = [slow.get_nowait() for _ in range(slow.qsize())]
    assert isinstance(items[-1], SlowClient)
    assert hub.client_count == 1  # the fast one is still subscribed
    drained.cancel()
    await subscription.close()
    publisher.close()


async def _drain(queue: asyncio.Queue) -> None:  # type: ignore[type-arg]
    while True:
        await queue.get()
