"""The read model's copy of a daemon over real sockets: order, reads after writes, lost changes, restarts.

A small daemon with a state feed (the same StateFeed runtimed and imaged use)
serves `write` and `snapshot` on a real bus socket and publishes on a real
event socket; its publishing can be held back or made to lose messages, as a
slow or overflowing socket would.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import zmq.asyncio

from services.frontend import read_model
from services.frontend.read_model import Mirror
from services.frontend.subscription import Subscription
from shared.bus import feed as feed_module
from shared.bus.api import ServiceApi, retried
from shared.bus.client import BusClient
from shared.bus.events import EventPublisher
from shared.bus.feed import StateFeed
from shared.bus.server import BusServer
from shared.bus.service import Service, method
from shared.config import Config
from tests.support.stack import short_tempdir

FEEDER_API = ServiceApi("feeder", {"health": retried("root"), "metrics": retried("root"),
                                   "write": retried("root"), "snapshot": retried("root")}, publishes_events=True)


class Outbox:
    """The daemon's way to its event socket, which a test can make slow or lossy."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher
        self.delay = 0.0
        self.lose_changes = 0  # the next this many changes are lost
        self.mute = False  # everything is lost
        self.lost: list[int] = []

    def publish(self, topic: str, message: dict[str, Any]) -> None:
        if self.mute:
            return
        if "key" in message and self.lose_changes:
            self.lose_changes -= 1
            self.lost.append(message["seq"])
            return
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, self.publisher.publish, topic, message)
        else:
            self.publisher.publish(topic, message)


class Feeder(Service):
    api = FEEDER_API

    def __init__(self, config: Config, outbox: Outbox) -> None:
        super().__init__(config)
        self.feed = StateFeed(outbox.publish)

    @method
    async def write(self, key: str, value: int | None = None) -> dict:
        self.feed.put(key, None if value is None else {"value": value})
        return {}

    @method
    async def snapshot(self, marker: str = "") -> dict:
        return self.feed.snapshot(marker)


class DictStore:
    def __init__(self) -> None:
        self.views: dict[str, Any] = {}

    def reset(self, views: dict[str, Any]) -> None:
        self.views = dict(views)

    def apply(self, key: str, view: Any) -> None:
        if view is None:
            self.views.pop(key, None)
        else:
            self.views[key] = view


class Rig:
    """A feeder daemon (restartable) and the frontend's side: a bus client, a subscription, a mirror."""

    def __init__(self, base: Path) -> None:
        self.endpoint = f"ipc://{base}/feeder.sock"
        self.events = f"ipc://{base}/feeder-events.sock"
        self.context = zmq.asyncio.Context()
        self.client = BusClient("feeder", self.endpoint, FEEDER_API.methods, context=self.context)
        self.mirror = Mirror("feeder", self.client, DictStore())
        self.subscription = Subscription(self.events, self.context,
                                         {"state": lambda _topic, message: self.mirror.receive(message)},
                                         on_connection=self.mirror.connection)
        self.daemon: Feeder | None = None
        self.outbox: Outbox | None = None
        self._server: BusServer | None = None
        self._publisher: EventPublisher | None = None

    async def start_daemon(self, beating: bool = True) -> Feeder:
        self._publisher = EventPublisher(self.events, self.context)
        self._publisher.bind()
        self.outbox = Outbox(self._publisher)
        self.daemon = Feeder(Config(), self.outbox)
        if beating:
            self.daemon.feed.start()
        self._server = BusServer(self.daemon, self.endpoint, max_message_bytes=1 << 20, context=self.context)
        await self._server.start()
        return self.daemon

    async def stop_daemon(self) -> None:
        assert self.daemon and self._server and self._publisher
        await self.daemon.feed.close()
        await self._server.close()
        self._publisher.close()

    def start_frontend(self) -> None:
        self.client.connect()
        self.subscription.start()
        self.mirror.start()

    async def write(self, key: str, value: int | None) -> None:
        await self.client.call("write", deadline=time.time() + 5, key=key, value=value)

    async def read(self) -> dict[str, Any] | None:
        """What a CRI read would answer from: the copy, or None (ask the daemon)."""
        store = await self.mirror.ready(time.time() + 5)
        return None if store is None else dict(store.views)

    def truth(self) -> dict[str, Any]:
        assert self.daemon is not None
        return self.daemon.feed.snapshot("")["views"]

    async def close(self) -> None:
        await self.mirror.close()
        await self.subscription.close()
        await self.client.close()
        if self.daemon is not None:
            await self.stop_daemon()
        self.context.term()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    base = short_tempdir("rm-")
    r = Rig(base)
    try:
        yield r
    finally:
        await r.close()
        shutil.rmtree(base, ignore_errors=True)


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "did not happen in time"
        await asyncio.sleep(0.01)


async def synced(rig: Rig) -> None:
    await eventually(lambda: rig.mirror.synced)


async def test_changes_are_applied_in_order_and_reads_follow_the_writes(rig: Rig) -> None:
    daemon = await rig.start_daemon()
    daemon.feed.put("k0", {"value": 0})  # there before the frontend: it comes with the snapshot
    rig.start_frontend()
    await synced(rig)
    for n in range(60):
        await rig.write(f"k{n % 7}", n)
        if n % 9 == 0:
            await rig.write(f"k{n % 5}", None)
        # Every read after a write sees it, and everything before it.
        assert await rig.read() == rig.truth()
    assert rig.mirror.applied == rig.daemon.feed.seq
    assert rig.mirror.syncs == 1


async def test_a_read_waits_for_the_change_its_write_made(rig: Rig) -> None:
    await rig.start_daemon()
    rig.start_frontend()
    await synced(rig)
    rig.outbox.delay = 0.3  # the change travels slower than the write's reply
    await rig.write("late", 1)
    assert "late" not in rig.mirror.store.views
    assert await rig.read() == {"late": {"value": 1}}
    assert rig.mirror.syncs == 1  # waited, no resync needed


async def test_a_lost_change_is_seen_as_a_gap_and_the_copy_resyncs(rig: Rig) -> None:
    await rig.start_daemon(beating=False)
    rig.start_frontend()
    await synced(rig)
    rig.outbox.lose_changes = 1
    await rig.write("lost", 1)
    await rig.write("next", 2)  # its number shows the one before is missing
    assert rig.outbox.lost == [1]
    await eventually(lambda: rig.mirror.syncs == 2)
    assert await rig.read() == {"lost": {"value": 1}, "next": {"value": 2}}


async def test_a_lost_last_change_is_caught_by_the_heartbeat(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed_module, "HEARTBEAT", 0.05)
    await rig.start_daemon()
    rig.start_frontend()
    await synced(rig)
    rig.outbox.lose_changes = 1
    # Written behind the frontend's back (not through its client): no reply tells the copy to wait.
    rig.daemon.feed.put("quiet", {"value": 1})
    await eventually(lambda: rig.mirror.synced and rig.mirror.store.views == {"quiet": {"value": 1}})
    assert rig.mirror.syncs == 2


async def test_a_restarted_daemon_is_followed_from_its_snapshot(rig: Rig) -> None:
    await rig.start_daemon()
    rig.start_frontend()
    await synced(rig)
    await rig.write("old", 1)
    first_epoch = rig.mirror.epoch
    assert await rig.read() == {"old": {"value": 1}}
    await rig.stop_daemon()
    new = await rig.start_daemon()
    new.feed.put("new", {"value": 2})  # the restarted daemon's state, made before anyone listens
    await rig.write("after", 3)
    assert await rig.read() in (None, {"new": {"value": 2}, "after": {"value": 3}})
    await synced(rig)
    assert await rig.read() == {"new": {"value": 2}, "after": {"value": 3}}
    assert rig.mirror.epoch == new.feed.epoch != first_epoch


async def test_no_answer_from_a_copy_not_yet_built(rig: Rig) -> None:
    rig.start_frontend()  # the daemon is not there yet
    assert await rig.read() is None
    await asyncio.sleep(0.2)
    assert await rig.read() is None and not rig.mirror.synced
    await rig.start_daemon()
    await synced(rig)
    assert await rig.read() == {}


async def test_a_read_that_cannot_catch_up_goes_to_the_daemon(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(read_model, "CATCH_UP_WAIT", 0.2)
    await rig.start_daemon(beating=False)
    rig.start_frontend()
    await synced(rig)
    rig.outbox.mute = True  # nothing reaches the frontend: not the change, not the snapshot's marker
    await rig.write("unseen", 1)
    assert await rig.read() is None
    assert not rig.mirror.synced  # it gave up on this copy and builds another
    rig.outbox.mute = False
    await synced(rig)
    assert await rig.read() == {"unseen": {"value": 1}}
