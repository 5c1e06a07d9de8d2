"""A daemon is one class; its public bus API is the methods marked `@method`.

    class Storaged(Service):
        name = "storaged"
        capabilities = frozenset({"CAP_SYS_ADMIN", "CAP_CHOWN"})

        @method(idempotent=True)
        async def create_rootfs(self, container_id: str, image_id: str) -> dict: ...

Parameters arrive as keyword arguments from the request's params map, and are
checked against the signature before the method runs; the return value must be
msgpack-serialisable. Raise errors from `shared.errors` to give the caller a
typed error. Declaring `idempotent=True` lets the frontend retry the call
while the daemon restarts.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar

from shared import metrics, privileges
from shared.config import Config
from shared.errors import Unavailable
from shared.version import VERSION

if TYPE_CHECKING:
    from shared.bus.events import EventPublisher
    from shared.bus.streams import StreamListener, StreamSession
    from shared.reload import ReloadResult

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    idempotent: bool
    func: Handler
    signature: inspect.Signature


def method(*, idempotent: bool, name: str | None = None) -> Callable[[Handler], Handler]:
    """Expose an async method of a Service on the bus."""

    def mark(func: Handler) -> Handler:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"bus method {func.__qualname__} must be async")
        func.__bus_method__ = (name or func.__name__, idempotent)  # type: ignore[attr-defined]
        return func

    return mark


class Service:
    """Base of the five services: its bus methods, capabilities and life cycle."""

    name: ClassVar[str]
    # Linux capabilities (CAP_* names) the service keeps; every other one is
    # dropped at start. None means "all that this machine grants".
    capabilities: ClassVar[frozenset[str] | None] = frozenset()
    # False: the service runs in a network namespace of its own, with no network.
    network: ClassVar[bool] = True
    # Whether the service publishes events (on config.events_endpoint(name)).
    publishes_events: ClassVar[bool] = False
    # Whether the service serves byte streams (on config.stream_socket(name)).
    serves_streams: ClassVar[bool] = False

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.ready = False
        self.publisher: "EventPublisher | None" = None  # set by the daemon runner
        self.streams: "StreamListener | None" = None  # set by the daemon runner when serves_streams

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        """Publish an event to the frontend (dropped when nobody listens)."""
        if self.publisher is not None:
            self.publisher.publish(topic, event)

    async def open_stream(self, session: "StreamSession") -> dict[str, str]:
        """Start a session streamed on the service's stream socket; {"token"} names it there."""
        if self.streams is None:
            raise Unavailable(f"{self.name} serves no streams")
        return {"token": await self.streams.open(session)}

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        """Reload state and reconcile it with the machine; runs before any request."""

    async def stop(self) -> None:
        """Release what `start` acquired."""

    async def apply_config(self, result: "ReloadResult") -> None:
        """React to options changed live (already copied into self.config); see shared/reload.py."""

    def readiness(self) -> dict[str, Any]:
        """Extra fields for `health`, e.g. whether the network is configured."""
        return {}

    # -- the API every service answers ------------------------------------

    @method(idempotent=True)
    async def health(self) -> dict[str, Any]:
        return {
            "service": self.name,
            "ready": self.ready,
            "pid": os.getpid(),
            "version": VERSION,
            "uptime": time.time() - self.started_at,
            "started_at": self.started_at,
            "capabilities": sorted(privileges.effective_capabilities()),
            "log_level": self.config.criopy.log.level_of(self.name, self.config.crio.runtime.log_level),
            **self.readiness(),
        }

    def refresh_metrics(self) -> None:
        """Bring gauges up to date just before they are read (e.g. objects by state)."""

    @method(idempotent=True)
    async def metrics(self) -> str:
        """This process's Prometheus metrics, in the text exposition format."""
        self.refresh_metrics()
        return metrics.exposition()

    # -- introspection used by the bus server -----------------------------

    @classmethod
    def bus_methods(cls) -> dict[str, MethodSpec]:
        methods: dict[str, MethodSpec] = {}
        for klass in reversed(cls.__mro__):
            for attr, func in vars(klass).items():
                marker = getattr(func, "__bus_method__", None)
                if marker is None:
                    continue
                name, idempotent = marker
                methods[name] = MethodSpec(name, idempotent, func, inspect.signature(func))
        return methods

    @classmethod
    def declared_capabilities(cls) -> frozenset[str]:
        """The capabilities this service keeps on this machine."""
        if cls.capabilities is None:
            return privileges.bounding_capabilities()
        return frozenset(cls.capabilities) & privileges.bounding_capabilities()
