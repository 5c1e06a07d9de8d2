"""Single-use, short-lived tokens naming a prepared exec/attach/port-forward request."""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

from shared.errors import ResourceExhausted

DEFAULT_TTL = 60.0
MAX_IN_FLIGHT = 1000


class TokenStore:
    def __init__(self, ttl: float = DEFAULT_TTL, max_in_flight: int = MAX_IN_FLIGHT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}

    def _purge(self) -> None:
        now = self._clock()
        for token in [t for t, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[token]

    def issue(self, request: dict[str, Any]) -> str:
        self._purge()
        if len(self._entries) >= self.max_in_flight:
            raise ResourceExhausted(f"too many streaming requests in flight (max {self.max_in_flight})")
        token = secrets.token_urlsafe(24)
        self._entries[token] = (self._clock() + self.ttl, dict(request))
        return token

    def consume(self, token: str) -> dict[str, Any] | None:
        """The request a token names, once; None for an unknown, used or expired token."""
        entry = self._entries.pop(token, None)
        if entry is None:
            return None
        expires, request = entry
        if expires <= self._clock():
            return None
        return request

    def __len__(self) -> int:
        self._purge()
        return len(self._entries)
