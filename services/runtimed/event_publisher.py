"""runtimed's container and pod events, published on the bus for GetContainerEvents.

Each event carries what the frontend needs for a CRI ContainerEventResponse:
the CRI event type, the container (or pod) id, when it happened, and the pod's
status with the statuses of its containers as they were at that moment (built
by status.py, as the sandbox_status/container_status calls build them).

Events raised while runtimed starts (exits that happened while it was down,
creations it finished on reattach), and until the frontend's subscriber has
reconnected, are held and then sent: a PUB socket drops what it sends before
anyone listens. Held events are marked `derived`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog
import zmq

from services.runtimed import infra, status
from services.runtimed.records import CONTAINER_STATES, SANDBOX_STATES
from shared.bus.sockets import Monitor

if TYPE_CHECKING:
    from services.runtimed.service import Runtimed

log = structlog.get_logger(__name__)

# How long derived events wait for the frontend to reconnect before they are sent anyway.
SUBSCRIBER_WAIT = 5.0
# Time for the subscriber's subscription to reach us once its connection is accepted.
SUBSCRIPTION_SETTLE = 0.2
# Longest wait for runtimed to finish starting before held events go out.
READY_WAIT = 300.0

CRI_TYPES = {
    ("container", "created"): "CONTAINER_CREATED_EVENT",
    ("container", "started"): "CONTAINER_STARTED_EVENT",
    ("container", "exited"): "CONTAINER_STOPPED_EVENT",
    ("container", "removed"): "CONTAINER_DELETED_EVENT",
    ("sandbox", "created"): "CONTAINER_CREATED_EVENT",
    ("sandbox", "stopped"): "CONTAINER_STOPPED_EVENT",
    ("sandbox", "removed"): "CONTAINER_DELETED_EVENT",
}


class EventPublisher:
    """Turns runtimed's Events hooks into bus events; see the module doc."""

    def __init__(self, service: "Runtimed") -> None:
        self.service = service
        self._last_container: dict[str, dict[str, Any]] = {}
        self._last_sandbox: dict[str, dict[str, Any]] = {}
        self._held: list[tuple[str, dict[str, Any]]] | None = []
        self._release: asyncio.Task[None] | None = None
        self.published = 0

    def attach(self) -> None:
        """Listen to runtimed's events; call before runtimed reconciles its containers."""
        self.service.add_event_hook(self.on_event)
        monitor = self._monitor()
        self._release = asyncio.get_running_loop().create_task(self._release_held(monitor),
                                                               name="runtimed-events-release")

    def _monitor(self) -> Monitor | None:
        publisher = self.service.publisher
        if publisher is None:
            return None
        try:
            return publisher.watch_subscribers()
        except zmq.ZMQError as e:
            log.warning("event_monitor_unavailable", error=str(e))
            return None

    async def _release_held(self, monitor: Monitor | None) -> None:
        """Send the events held during start once runtimed is ready and a subscriber is back."""
        try:
            waited = 0.0
            while not self.service.ready and waited < READY_WAIT:
                await asyncio.sleep(0.05)
                waited += 0.05
            if monitor is not None:
                # Also with nothing held yet: an exit seen right after start must not go out
                # before the frontend is listening again.
                try:
                    await asyncio.wait_for(monitor.next(), SUBSCRIBER_WAIT)
                    await asyncio.sleep(SUBSCRIPTION_SETTLE)
                except asyncio.TimeoutError:
                    log.info("events_released_without_subscriber", held=len(self._held or []))
        finally:
            held, self._held = self._held or [], None
            if monitor is not None:
                monitor.close()
            for topic, event in held:
                self._send(topic, event)
            if held:
                log.info("derived_events_published", count=len(held))

    async def close(self) -> None:
        if self._release is not None and not self._release.done():
            self._release.cancel()
            await asyncio.gather(self._release, return_exceptions=True)

    def _send(self, topic: str, event: dict[str, Any]) -> None:
        self.service.publish(topic, event)
        self.published += 1

    # -- building events --------------------------------------------------------

    def on_event(self, record: dict[str, Any]) -> None:
        kind, name = record["kind"], record["event"]
        event = self.build(record)
        if event is None:
            return
        if self._held is not None:
            event["derived"] = True
            self._held.append((kind, event))
        else:
            self._send(kind, event)
        if name == "removed":
            (self._last_container if kind == "container" else self._last_sandbox).pop(record["id"], None)

    def build(self, record: dict[str, Any]) -> dict[str, Any] | None:
        kind, name = record["kind"], record["event"]
        sandbox_id = record.get("sandbox_id") or ""
        event: dict[str, Any] = {
            "kind": kind, "event": name, "container_id": record["id"], "pod_sandbox_id": sandbox_id,
            "type": CRI_TYPES.get((kind, name)), "created_at": record.get("timestamp_ns", 0),
        }
        for key in ("exit_code",):
            if key in record:
                event[key] = record[key]
        if kind == "container":
            container = self.container_status(record["id"])
            if container is not None:
                event["container_status"] = container
        event["pod_sandbox_status"] = self.sandbox_status(sandbox_id)
        event["containers_statuses"] = self.pod_container_statuses(sandbox_id)
        return event

    def container_status(self, container_id: str) -> dict[str, Any] | None:
        """The container's status now; once it is gone, the last one it had."""
        rec = self.service.containers.get(container_id)
        if rec is None or rec.get("state") not in CONTAINER_STATES:
            return self._last_container.get(container_id)
        entry = status.container_status(rec)
        self._last_container[container_id] = entry
        return entry

    def sandbox_status(self, sandbox_id: str) -> dict[str, Any] | None:
        """The pod's status now; once it is gone, the last one it had, not ready."""
        rec = self.service.sandboxes.get(sandbox_id)
        if rec is None or rec.get("state") not in SANDBOX_STATES:
            last = self._last_sandbox.get(sandbox_id)
            return {**last, "state": "SANDBOX_NOTREADY"} if last else None
        infra.check(self.service.ctx, rec)
        entry = status.sandbox_status(rec)
        self._last_sandbox[sandbox_id] = entry
        return entry

    def pod_container_statuses(self, sandbox_id: str) -> list[dict[str, Any]]:
        out = []
        for rec in list(self.service.containers.values()):
            if rec.get("sandbox_id") == sandbox_id and rec.get("state") in CONTAINER_STATES:
                entry = self.container_status(rec["id"])
                if entry is not None:
                    out.append(entry)
        return out
