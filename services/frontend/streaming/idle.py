"""Closing streaming connections that carried no byte either way for the idle timeout."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration ("4h", "1h30m", "90s", "0"); 0 means no timeout."""
    text = text.strip()
    if text in ("", "0"):
        return 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


class Activity:
    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


class WatchedReader:
    """An asyncio.StreamReader that records when bytes arrive."""

    def __init__(self, inner: asyncio.StreamReader, activity: Activity) -> None:
        self._inner = inner
        self._activity = activity

    async def read(self, n: int = -1) -> bytes:
        data = await self._inner.read(n)
        self._activity.touch()
        return data

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        data = await self._inner.readuntil(separator)
        self._activity.touch()
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class WatchedWriter:
    """An asyncio.StreamWriter that records when bytes leave."""

    def __init__(self, inner: asyncio.StreamWriter, activity: Activity) -> None:
        self._inner = inner
        self._activity = activity

    def write(self, data: bytes) -> None:
        self._activity.touch()
        self._inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def close_when_idle(activity: Activity, timeout: float, on_idle: Any) -> None:
    """Call `on_idle()` once nothing moved for `timeout` seconds."""
    while True:
        remaining = activity.last + timeout - time.monotonic()
        if remaining <= 0:
            on_idle()
            return
        await asyncio.sleep(min(remaining + 0.01, 60.0))
