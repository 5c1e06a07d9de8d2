"""The read model: runtimed's pods and containers and imaged's images, kept in the frontend's memory.

The kubelet lists pods and containers and asks their status every second;
a bus hop costs more than the rest of such a call. So the frontend keeps a
copy of what those calls read, fed by the daemons' state feeds
(shared/bus/feed.py), and answers ListPodSandbox, ListContainers,
PodSandboxStatus and ContainerStatus (non-verbose; runtime_view.py), ListImages
and ImageStatus (non-verbose; image_view.py) from it, without a hop. Status
answers from health probes made beside the requests (health_watch.py), and
ImageFsInfo and the stats calls reuse an answer for a short while when nothing
changed (answer_cache.py). Verbose calls, and every write, still go to the
daemons.

Correctness, per daemon:

- Numbered changes. runtimed and imaged number every change of what these
  calls show (their feed's `seq`), under an `epoch` that is new each time the
  daemon starts. A change is published as it happens, with the full view of
  the object (a pod's status, an image's record, or None once it is gone), so
  an exit or an OOM kill, which no CRI call makes, needs no follow-up call.
- A read sees the writes before it. Every bus reply carries the daemon's
  position (epoch, seq) once the request was served; the bus client keeps the
  furthest one (BusClient.seq). A read takes the position the client has when
  the read begins, and waits (at most CATCH_UP_WAIT, within its deadline)
  until the copy has applied that change; so a caller always reads its own
  writes, and everyone else's that were answered before. This is simpler
  than tracking callers, and as safe.
- Changes are applied in order. A change whose number is not the next one
  (a message lost on the way: ZeroMQ drops for a subscriber that falls too
  far behind), a heartbeat or marker beyond the copy, or another epoch (the
  daemon restarted) makes the copy resynchronise; so does the event socket
  losing its connection, and a read that waited CATCH_UP_WAIT in vain.
- Resynchronising: the subscription is already open; the frontend asks the
  daemon for a `snapshot` (every view and the position they reflect) with a
  fresh marker token; the daemon publishes the marker right after taking the
  snapshot. Changes that arrive meanwhile are held. Once the marker arrives
  the subscription is known to be live, the copy becomes the snapshot, and
  the held changes after the marker are applied in order. No marker within
  MARKER_WAIT (the subscription was not live yet): again.
- Never answer from a copy that is not in step. Until the first snapshot
  after the frontend starts, while resynchronising (a daemon restart), and
  when a read cannot wait long enough, the read goes to the daemon as before
  the read model existed. A frontend restart loses nothing: the copy is
  built again from snapshots.

`[criopy.frontend] read_model = false` turns all of this off.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Protocol

import structlog

from services.frontend.answer_cache import AnswerCache
from services.frontend.health_watch import HealthWatch
from services.frontend.image_view import ImageView
from services.frontend.runtime_view import RuntimeView
from shared import metrics, tracing
from shared.bus.client import BusClient
from shared.config import Config
from shared.errors import CriopyError

log = structlog.get_logger(__name__)

# Longest a read waits for the copy to reach the caller's writes before it asks the daemon instead.
CATCH_UP_WAIT = 1.0
# How long a snapshot's marker may take to come back on the feed.
MARKER_WAIT = 0.5
# How long a snapshot call may take (the daemon may be restarting).
SNAPSHOT_TIMEOUT = 10.0
# Pause after a failed attempt, doubling up to the second.
RETRY_PAUSE = 0.05
MAX_RETRY_PAUSE = 1.0


class Store(Protocol):
    """A daemon's objects as the read model keeps them."""

    def reset(self, views: dict[str, Any]) -> None: ...

    def apply(self, key: str, view: Any) -> None: ...


class Mirror:
    """One daemon's copy: fed by `receive` (its feed's messages) and `connection` (its event socket's state)."""

    def __init__(self, daemon: str, client: BusClient, store: Store) -> None:
        self.daemon = daemon
        self.client = client
        self.store = store
        self.synced = False
        self.epoch: str | None = None
        self.applied = 0
        self.syncs = 0
        # While resynchronising: the feed's messages, held until the snapshot's marker is seen.
        self._held: list[dict[str, Any]] | None = None
        self._marker: str | None = None
        self._marker_seen = asyncio.Event()
        self._again = False
        self._syncing: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        self._waiters = 0

    def start(self) -> None:
        self.resync("start")

    async def close(self) -> None:
        if self._syncing is not None:
            self._syncing.cancel()
            await asyncio.gather(self._syncing, return_exceptions=True)

    # -- reads ---------------------------------------------------------------------

    async def ready(self, deadline: float) -> Any:
        """The store, once it holds every change the client has seen confirmed; None: ask the daemon."""
        if not self.synced:
            return None
        need = self.client.seq
        if need is None or (need[0] == self.epoch and need[1] <= self.applied):
            return self.store
        if need[0] != self.epoch:
            # A reply came from a daemon that started since the snapshot: its feed will say so too.
            self.resync("new epoch in a reply")
            return None
        until = min(deadline, time.time() + CATCH_UP_WAIT)
        while self.synced and self.epoch == need[0] and self.applied < need[1]:
            remaining = until - time.time()
            if remaining <= 0:
                log.warning("read_model_behind", daemon=self.daemon, applied=self.applied, needed=need[1])
                self.resync("behind the replies")
                return None
            self._waiters += 1
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                self._waiters -= 1
        return self.store if self.synced and self.epoch == need[0] else None

    def _wake(self) -> None:
        if self._waiters:
            progress, self._progress = self._progress, asyncio.Event()
            progress.set()

    # -- the feed --------------------------------------------------------------------

    def receive(self, message: dict[str, Any]) -> None:
        """A message of the daemon's feed, in the order it was published."""
        if self._held is not None:
            self._held.append(message)
            if self._marker is not None and message.get("marker") == self._marker:
                self._marker_seen.set()
            return
        if self.synced and not self._take(message):
            self.resync("gap in the feed")

    def connection(self, up: bool) -> None:
        """The event socket connected, or lost its daemon: from then on what goes by is unknown. (When it
        connects again, the snapshot's marker tells when the feed is heard again.)"""
        if not up:
            self.resync("event socket disconnected")

    def _take(self, message: dict[str, Any]) -> bool:
        """Apply one message in step; False when it shows the copy is not in step."""
        epoch, seq = message.get("epoch"), message.get("seq")
        if epoch != self.epoch or not isinstance(seq, int):
            return False
        if "key" not in message:  # a heartbeat or a marker: where the feed is
            return seq <= self.applied
        if seq <= self.applied:
            return True
        if seq != self.applied + 1:
            return False
        try:
            self.store.apply(message["key"], message.get("view"))
        except Exception as e:  # a view the store cannot read: the snapshot gets another chance
            log.error("read_model_bad_view", daemon=self.daemon, key=message.get("key"), error=repr(e))
            return False
        self.applied = seq
        self._wake()
        return True

    # -- resynchronising -----------------------------------------------------------

    def resync(self, reason: str) -> None:
        """Stop answering from the copy, and build it again from a snapshot."""
        if self.synced:
            log.info("read_model_resync", daemon=self.daemon, reason=reason)
        self.synced = False
        self._wake()
        if self._syncing is None or self._syncing.done():
            self._held = []
            self._syncing = asyncio.get_running_loop().create_task(self._sync(), name=f"read-model-{self.daemon}")
        else:
            self._again = True

    async def _sync(self) -> None:
        pause = RETRY_PAUSE
        with tracing.untraced():
            while True:
                self._again = False
                if await self._attempt() and not self._again:
                    self.synced = True
                    self.syncs += 1
                    metrics.READ_MODEL_SYNCS.labels(self.daemon).inc()
                    self._wake()
                    log.info("read_model_synced", daemon=self.daemon, epoch=self.epoch, seq=self.applied)
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_RETRY_PAUSE)

    async def _attempt(self) -> bool:
        self._held = []
        self._marker = marker = os.urandom(8).hex()
        self._marker_seen.clear()
        try:
            snapshot = await self.client.call("snapshot", deadline=time.time() + SNAPSHOT_TIMEOUT, marker=marker)
            await asyncio.wait_for(self._marker_seen.wait(), MARKER_WAIT)
        except CriopyError as e:
            log.info("read_model_snapshot_failed", daemon=self.daemon, error=e.message)
            return False
        except asyncio.TimeoutError:
            log.debug("read_model_marker_late", daemon=self.daemon)
            return False
        held, self._held = self._held, None
        after = next(i for i, m in enumerate(held) if m.get("marker") == marker) + 1
        try:
            self.store.reset(snapshot["views"])
            self.epoch, self.applied = snapshot["epoch"], snapshot["seq"]
        except Exception as e:
            log.error("read_model_bad_snapshot", daemon=self.daemon, error=repr(e))
            return False
        return all(self._take(m) for m in held[after:])


class ReadModel:
    """The copies of runtimed and imaged, Status's health probes, and the short-lived answers."""

    def __init__(self, config: Config, clients: dict[str, BusClient]) -> None:
        self.runtime = Mirror("runtimed", clients["runtimed"], RuntimeView())
        self.images = Mirror("imaged", clients["imaged"], ImageView())
        self.mirrors = {"runtimed": self.runtime, "imaged": self.images}
        settings = config.criopy.frontend
        self.health = HealthWatch(clients, ("runtimed", "netd"), settings.health_interval,
                                  config.criopy.bus.health_timeout)
        self.cache = AnswerCache(settings.cache_ttl, self.version)

    def start(self) -> None:
        for mirror in self.mirrors.values():
            mirror.start()
        self.health.start()

    async def close(self) -> None:
        await self.health.close()
        for mirror in self.mirrors.values():
            await mirror.close()

    async def view(self, daemon: str, deadline: float) -> Any:
        """The daemon's store, in step with every write answered so far; None: ask the daemon."""
        return await self.mirrors[daemon].ready(deadline)

    def version(self) -> tuple[Any, ...]:
        """Changes with any change of a pod, container or image, seen on a feed or in a reply."""
        return tuple((m.epoch, m.applied, m.client.seq) for m in self.mirrors.values())
