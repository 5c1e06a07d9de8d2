"""CRI calls register here: one module per call (or small family), one decorator each.

    @cri_method("PullImage")
    async def pull_image(request: api_pb2.PullImageRequest, call: CallContext) -> api_pb2.PullImageResponse:
        result = await call.daemon("imaged", "pull", reference=request.image.image)
        ...

Every module in `services/frontend/` is imported at start, so a new CRI call is
one new module. A CRI method without a registered handler is routed to the
daemon that owns it (see routing.py).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc

from shared.config import Config

Handler = Callable[..., Any]
HANDLERS: dict[str, Handler] = {}


@dataclass
class CallContext:
    """What a CRI handler gets besides its request."""

    daemons: Any  # services.frontend.daemons.Daemons
    config: Config
    deadline: float  # unix time by which the daemons' work must be done
    request_id: str
    grpc_context: grpc.aio.ServicerContext

    async def daemon(self, name: str, method: str, **params: Any) -> Any:
        """Call a daemon's bus method within this CRI call's deadline."""
        return await self.daemons.call(name, method, deadline=self.deadline, **params)

    async def mirrored(self, name: str) -> Any:
        """The read model's copy of a daemon's objects, in step with every write answered so far
        (runtime_view.RuntimeView, image_view.ImageView); None: ask the daemon (read_model.py)."""
        model = self.daemons.model
        return None if model is None else await model.view(name, self.deadline)

    async def reused(self, key: Any, compute: Callable[[], Awaitable[Any]]) -> Any:
        """`compute()`'s answer, or the same request's recent one while nothing changed (answer_cache.py)."""
        model = self.daemons.model
        return await compute() if model is None else await model.cache.get(key, compute)


def cri_method(name: str) -> Callable[[Handler], Handler]:
    def register(func: Handler) -> Handler:
        if name in HANDLERS and HANDLERS[name] is not func:
            raise RuntimeError(f"two handlers for the CRI method {name}")
        HANDLERS[name] = func
        return func

    return register


def load_handlers() -> dict[str, Handler]:
    """Import every module of the frontend package so their handlers register."""
    package = importlib.import_module("services.frontend")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"services.frontend.{module.name}")
    return HANDLERS
