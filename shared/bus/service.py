"""A daemon is one class; it implements its row of the API table (shared/bus/api.py) with `@method`.

    class Storaged(Service):
        api = STORAGED
        capabilities = frozenset({"CAP_SYS_ADMIN", "CAP_CHOWN"})

        @method
        async def create_rootfs(self, container_id: str, image_id: str) -> dict: ...

The table, not the class, says what a method is (idempotent or not, who may
call it), so that callers read it without importing the daemon. A class that
does not implement exactly its table is refused before it serves anything
(`bus_methods` raises ApiMismatch).

Parameters arrive as keyword arguments from the request's params map, and are
checked against the signature before the method runs; the return value must be
msgpack-serialisable. Raise errors from `shared.errors` to give the caller a
typed error.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar

from shared import metrics, privileges
from shared.bus.api import MethodInfo, ServiceApi
from shared.config import Config
from shared.errors import ApiMismatch, Unavailable
from shared.version import VERSION

if TYPE_CHECKING:
    from shared.bus.events import EventPublisher
    from shared.bus.feed import StateFeed
    from shared.bus.streams import StreamListener, StreamSession
    from shared.reload import ReloadResult

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class MethodSpec:
    """A bus method as the server runs it: its row of the table, and the code that implements it."""

    name: str
    info: MethodInfo
    func: Handler
    signature: inspect.Signature

    @property
    def idempotent(self) -> bool:
        return self.info.idempotent


def method(func: Handler) -> Handler:
    """Expose an async method of a Service on the bus, under its own name."""
    if not inspect.iscoroutinefunction(func):
        raise TypeError(f"bus method {func.__qualname__} must be async")
    func.__bus_method__ = func.__name__  # type: ignore[attr-defined]
    return func


class Service:
    """Base of the five services: its bus methods, capabilities and life cycle."""

    # Its row of the API table; `name`, `network`, `publishes_events` and `serves_streams` come from it.
    api: ClassVar[ServiceApi]
    name: ClassVar[str]
    # Linux capabilities (CAP_* names) the service keeps; every other one is
    # dropped at start. None means "all that this machine grants".
    capabilities: ClassVar[frozenset[str] | None] = frozenset()
    # Capabilities held only until `bind()` has run, never in the bounding set (the frontend's
    # CAP_CHOWN, to give the CRI socket its owner before it leaves root).
    bind_capabilities: ClassVar[frozenset[str]] = frozenset()
    # False: the service runs in a network namespace of its own, with no network.
    network: ClassVar[bool] = True
    # Whether the service publishes events (on config.events_endpoint(name)).
    publishes_events: ClassVar[bool] = False
    # Whether the service serves byte streams (on config.stream_socket(name)).
    serves_streams: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        api = cls.__dict__.get("api")
        if api is not None:
            cls.name, cls.network = api.name, api.network
            cls.publishes_events, cls.serves_streams = api.publishes_events, api.serves_streams

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.ready = False
        self.publisher: "EventPublisher | None" = None  # set by the daemon runner
        self.streams: "StreamListener | None" = None  # set by the daemon runner when serves_streams
        # The numbered changes the frontend's read model follows (shared/bus/feed.py), for a
        # service that has one: its position goes out with every reply.
        self.feed: "StateFeed | None" = None

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

    async def bind(self) -> None:
        """Open what only root may open, before the service changes user; runs first of all."""

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

    @method
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

    @method
    async def metrics(self) -> str:
        """This process's Prometheus metrics, in the text exposition format."""
        self.refresh_metrics()
        return metrics.exposition()

    # -- introspection used by the bus server -----------------------------

    @classmethod
    @functools.cache
    def bus_methods(cls) -> dict[str, MethodSpec]:
        """The methods the bus server dispatches to; ApiMismatch unless they are exactly the table's."""
        implemented: dict[str, Handler] = {}
        for klass in reversed(cls.__mro__):
            for func in vars(klass).values():
                name = getattr(func, "__bus_method__", None)
                if name is not None:
                    implemented[name] = func
        declared = cls.api.methods
        missing = sorted(set(declared) - set(implemented))
        undeclared = sorted(set(implemented) - set(declared))
        if missing or undeclared:
            raise ApiMismatch(
                f"{cls.__qualname__} does not implement the bus API of {cls.api.name} (shared/bus/api.py): "
                + "; ".join(part for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"not in the table: {', '.join(undeclared)}" if undeclared else "") if part))
        return {name: MethodSpec(name, declared[name], func, inspect.signature(func))
                for name, func in implemented.items()}

    @classmethod
    def declared_capabilities(cls) -> frozenset[str]:
        """The capabilities this service keeps on this machine."""
        if cls.capabilities is None:
            return privileges.bounding_capabilities()
        return frozenset(cls.capabilities) & privileges.bounding_capabilities()
