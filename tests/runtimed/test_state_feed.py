"""runtimed's state feed read by the frontend's read model: the copy answers what runtimed answers.

A real runtimed (real runc and conmon) serves its bus and event sockets; the
frontend's side (bus client, subscription, mirror and runtime view) follows it.
Writes go through the bus client, as the frontend's stories make them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any, AsyncIterator, Callable

import pytest
import zmq.asyncio
from cri_api.v1 import api_pb2

from services.frontend.read_model import Mirror
from services.frontend.runtime_convert import to_message
from services.frontend.runtime_view import RuntimeView
from services.frontend.subscription import Subscription
from services.runtimed.service import Runtimed
from shared.bus.api import RUNTIMED
from shared.bus.client import BusClient
from shared.bus.events import EventPublisher
from shared.bus.feed import TOPIC
from shared.bus.server import BusServer
from tests.runtimed.conftest import IMAGE, container_config, pod_config

pytestmark = pytest.mark.root


class Frontend:
    """The frontend's side of runtimed: its bus client and its read model's copy."""

    def __init__(self, runtimed: Runtimed, context: zmq.asyncio.Context) -> None:
        self.runtimed = runtimed
        config = runtimed.config
        self.client = BusClient("runtimed", config.bus_endpoint("runtimed"), RUNTIMED.methods, context=context)
        self.mirror = Mirror("runtimed", self.client, RuntimeView())
        self.subscription = Subscription(config.events_endpoint("runtimed"), context,
                                         {TOPIC: lambda _topic, message: self.mirror.receive(message)},
                                         on_connection=self.mirror.connection)

    async def call(self, method: str, **params: Any) -> Any:
        return await self.client.call(method, deadline=time.time() + 60, **params)

    async def view(self) -> RuntimeView:
        """The copy a CRI read would answer from, once in step."""
        await eventually(lambda: self.mirror.synced)
        view = await self.mirror.ready(time.time() + 10)
        assert view is not None
        return view

    async def new_pod(self, cgroup_parent: str, **kw: Any) -> str:
        reserved = await self.call("reserve_sandbox", config=pod_config(cgroup_parent, **kw))
        await self.call("create_sandbox", sandbox_id=reserved["id"])
        return reserved["id"]

    async def new_container(self, pod: str, rootfs: str, config: dict[str, Any], start: bool = True) -> str:
        reserved = await self.call("reserve_container", sandbox_id=pod, config=config)
        await self.call("create_container", container_id=reserved["id"], rootfs=rootfs, image=IMAGE)
        if start:
            await self.call("start_container", container_id=reserved["id"])
        return reserved["id"]


async def eventually(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "did not happen in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def frontend(runtimed: Runtimed) -> AsyncIterator[Frontend]:
    context = zmq.asyncio.Context()
    runtimed.config.bus_dir().mkdir(parents=True, exist_ok=True)
    runtimed.publisher = EventPublisher(runtimed.config.events_endpoint("runtimed"), context)
    runtimed.publisher.bind()
    server = BusServer(runtimed, runtimed.config.bus_endpoint("runtimed"), max_message_bytes=1 << 24, context=context)
    await server.start()
    side = Frontend(runtimed, context)
    side.client.connect()
    side.subscription.start()
    side.mirror.start()
    try:
        yield side
    finally:
        await side.mirror.close()
        await side.subscription.close()
        await side.client.close()
        await server.close()
        runtimed.publisher.close()
        runtimed.publisher = None
        context.term()


async def assert_same_answers(side: Frontend) -> None:
    """Every list and status the copy gives is what runtimed itself answers."""
    rt, view = side.runtimed, await side.view()
    pods = [to_message(e, api_pb2.PodSandbox) for e in await rt.list_sandboxes()]
    assert list(view.list_pods(None).items) == pods
    containers = [to_message(e, api_pb2.Container) for e in await rt.list_containers()]
    assert list(view.list_containers(None).containers) == containers
    for pod in pods:
        status = (await rt.sandbox_status(sandbox_id=pod.id))["status"]
        assert view.pod_status(pod.id).status == to_message(status, api_pb2.PodSandboxStatus)
        only = api_pb2.ContainerFilter(pod_sandbox_id=pod.id[:10])
        assert list(view.list_containers(only).containers) == [c for c in containers if c.pod_sandbox_id == pod.id]
    for container in containers:
        status = (await rt.container_status(container_id=container.id))["status"]
        assert view.container_status(container.id[:20]).status == to_message(status, api_pb2.ContainerStatus)


async def test_the_copy_answers_what_runtimed_answers(frontend: Frontend, cgroup_parent: str, rootfs: str) -> None:
    pod = await frontend.new_pod(cgroup_parent, name="web")
    other = await frontend.new_pod(cgroup_parent, name="db")
    created = await frontend.new_container(pod, rootfs, container_config("made", command=["sleep", "600"]),
                                           start=False)
    assert (await frontend.view()).container_status(created).status.state == api_pb2.CONTAINER_CREATED
    running = await frontend.new_container(pod, rootfs, container_config("runs", command=["sleep", "600"]))
    assert (await frontend.view()).container_status(running).status.state == api_pb2.CONTAINER_RUNNING
    await frontend.new_container(other, rootfs, container_config("other", command=["sleep", "600"]))
    await assert_same_answers(frontend)

    await frontend.call("stop_container", container_id=running, timeout=0)
    stopped = (await frontend.view()).container_status(running).status
    assert stopped.state == api_pb2.CONTAINER_EXITED and stopped.exit_code == 137
    await frontend.call("stop_sandbox", sandbox_id=other)
    assert (await frontend.view()).pod_status(other).status.state == api_pb2.SANDBOX_NOTREADY
    await assert_same_answers(frontend)

    await frontend.call("remove_container", container_id=created)
    assert created not in (await frontend.view()).containers
    await frontend.call("remove_sandbox", sandbox_id=other)
    view = await frontend.view()
    assert other not in view.pods and [c.pod_sandbox_id for c in view.list_containers(None).containers] == [pod]
    await assert_same_answers(frontend)
    assert frontend.mirror.syncs == 1


async def test_an_exit_nobody_asked_about_reaches_the_copy(frontend: Frontend, cgroup_parent: str,
                                                           rootfs: str) -> None:
    pod = await frontend.new_pod(cgroup_parent, pid="POD")  # with an infra process
    cid = await frontend.new_container(pod, rootfs, container_config(command=["sleep", "600"]))
    applied = frontend.mirror.applied
    os.kill(frontend.runtimed.containers[cid]["pid"], signal.SIGKILL)
    # No call made: runtimed's exit watcher records the exit, and its feed carries the status.
    await eventually(lambda: frontend.mirror.store.container_status(cid).status.state == api_pb2.CONTAINER_EXITED)
    status = frontend.mirror.store.container_status(cid).status
    assert status.exit_code == 137 and status.reason == "Error" and status.finished_at >= status.started_at > 0
    assert frontend.mirror.applied > applied
    # The pod's infra process killed: the pod is not ready any more, also without a call.
    os.kill(frontend.runtimed.sandboxes[pod]["infra"]["pid"], signal.SIGKILL)
    await eventually(lambda: frontend.mirror.store.pod_status(pod).status.state == api_pb2.SANDBOX_NOTREADY)
    await assert_same_answers(frontend)


async def test_a_lost_change_makes_the_copy_resync(frontend: Frontend, cgroup_parent: str, rootfs: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pod = await frontend.new_pod(cgroup_parent)
    await frontend.view()
    publisher = frontend.runtimed.publisher
    real = publisher.publish
    lost: list[int] = []

    def lose_one_change(topic: str, message: dict[str, Any]) -> None:
        if topic == TOPIC and "key" in message and not lost:
            lost.append(message["seq"])
            return
        real(topic, message)

    monkeypatch.setattr(publisher, "publish", lose_one_change)
    cid = await frontend.new_container(pod, rootfs, container_config(command=["sleep", "600"]), start=False)
    assert lost
    # The copy notices (the next change's number, or the next heartbeat) and takes a snapshot.
    await eventually(lambda: frontend.mirror.syncs == 2)
    assert (await frontend.view()).container_status(cid).status.state == api_pb2.CONTAINER_CREATED
    await frontend.call("start_container", container_id=cid)
    assert (await frontend.view()).container_status(cid).status.state == api_pb2.CONTAINER_RUNNING
    await assert_same_answers(frontend)
