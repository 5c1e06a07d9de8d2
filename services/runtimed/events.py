"""Where runtimed's container and sandbox events happen, and who hears them.

Event points (each emits one event dict):
  sandbox:   created (namespaces, files, cgroup and infra ready), stopped, removed
  container: created (conmon + runc create done), started, exited (exit file seen),
             oom (exited with an OOM kill), removed
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

import structlog

log = structlog.get_logger(__name__)

Hook = Callable[[dict[str, Any]], None]

CONTAINER_EVENTS = ("created", "started", "exited", "oom", "removed")
SANDBOX_EVENTS = ("created", "stopped", "removed")


class Events:
    def __init__(self, keep: int = 1000) -> None:
        self._hooks: list[Hook] = []
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)

    def subscribe(self, hook: Hook) -> None:
        self._hooks.append(hook)

    def emit(self, kind: str, event: str, object_id: str, sandbox_id: str, **extra: Any) -> None:
        record = {"kind": kind, "event": event, "id": object_id, "sandbox_id": sandbox_id,
                  "timestamp_ns": time.time_ns(), **extra}
        self.recent.append(record)
        for hook in list(self._hooks):
            try:
                hook(record)
            except Exception as e:  # a listener never breaks the runtime
                log.warning("event_hook_failed", event=event, error=str(e))
