"""Protobuf <-> runtimed's plain dicts, and running a creation story past the caller's cancellation."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, TypeVar

import structlog
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.message import Message

from services.frontend.registry import CallContext
from shared import metrics
from shared.errors import DeadlineExceeded

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=Message)
T = TypeVar("T")

# A story the kubelet gave up on keeps running this long, so that its retry
# finds the pod or container made instead of starting over.
DETACHED_GRACE = 120.0
# Undo steps get their own time, even when the call's deadline has passed.
UNDO_TIMEOUT = 30.0


def to_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def to_message(data: dict[str, Any], cls: type[M]) -> M:
    """`data` as a `cls`, read as ParseDict reads it (JSON names, int64 as strings, unknown keys ignored).

    A daemon's dict is most often shaped like the message already, and the constructor
    takes it (nested dicts, enum names and all) about ten times faster than ParseDict,
    which List* pays once per pod or container. The constructor refuses whatever it
    would read differently, and that dict takes ParseDict's way."""
    try:
        return cls(**data)
    except (TypeError, ValueError):
        return ParseDict(data, cls(), ignore_unknown_fields=True)


def remaining(call: CallContext, margin: float = 1.0) -> float:
    return max(0.0, call.deadline - time.time() - margin)


# The stage each creation story is at, by the name of the pod or container it makes: a
# retry that finds its first request still at work says where that one is stalled.
_STAGES = {
    ("netd", "attach"): "sandbox network creation",
    ("runtimed", "prepare_sandbox"): "sandbox runtime creation",
    ("runtimed", "create_sandbox"): "sandbox runtime creation",
    ("imaged", "image_status"): "container image lookup",
    ("storaged", "create_rootfs"): "container storage creation",
    ("runtimed", "create_container"): "container runtime creation",
}
_in_progress: dict[str, str] = {}


def note_if_stalled(key: str) -> None:
    """Count a request for `key` that arrives while an earlier one is still making it."""
    stage = _in_progress.get(key)
    if stage is not None:
        log.info("creation_stalled", resource=key, stage=stage)
        metrics.CRIO_RESOURCES_STALLED.labels(stage).inc()


class Story:
    """Bus calls of one multi-step CRI call, with a deadline that outlives the caller's.

    `key` names what the story makes (see `note_if_stalled`)."""

    def __init__(self, call: CallContext, key: str) -> None:
        self.call = call
        self.key = key
        self.deadline = call.deadline + DETACHED_GRACE
        self.at = ""  # the step running (the earliest started of those running), "daemon.method"
        self._running: list[tuple[str, str]] = []

    async def step(self, daemon: str, method: str, **params: Any) -> Any:
        self._running.append((daemon, method))
        self._show()
        try:
            return await self.call.daemons.call(daemon, method, deadline=self.deadline, **params)
        finally:
            self._running.remove((daemon, method))
            if self._running:
                self._show()

    def _show(self) -> None:
        daemon, method = self._running[0]
        _in_progress[self.key] = _STAGES.get((daemon, method), f"{daemon} {method}")
        self.at = f"{daemon}.{method}"

    def finished(self) -> None:
        _in_progress.pop(self.key, None)

    async def undo(self, daemon: str, method: str, **params: Any) -> Any:
        """An undo step, its reply returned: a failure is logged (None), never raised over the first error."""
        try:
            return await self.call.daemons.call(daemon, method, deadline=time.time() + UNDO_TIMEOUT, **params)
        except Exception as e:  # the original failure is the one the kubelet must see
            log.warning("undo_step_failed", daemon=daemon, method=method, error=str(e))
            return None


async def detached(story: Story, work: Callable[[], Awaitable[T]], *, answer_by: float | None = None) -> T:
    """Run `work` to its end even if the gRPC call is cancelled (the kubelet's deadline).

    With `answer_by` (a unix time), the caller hears DeadlineExceeded then, naming the step the
    work is at, while the work goes on.
    """

    async def run() -> T:
        try:
            return await work()
        finally:
            story.finished()

    task = asyncio.ensure_future(run())
    # When nobody waits any more, its failure was already undone and logged by the bus client.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    if answer_by is None:
        return await asyncio.shield(task)
    try:
        return await asyncio.wait_for(asyncio.shield(task), max(0.0, answer_by - time.time()))
    except asyncio.TimeoutError:
        raise DeadlineExceeded(f"{story.at or story.key} did not complete before the caller's deadline; "
                               "it goes on, and a retry finds its result") from None
