"""The streaming server for Exec, Attach and PortForward: one per frontend process."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from shared.config import Config

if TYPE_CHECKING:
    from services.frontend.streaming.server import StreamingServer

_server: "StreamingServer | None" = None
_lock: asyncio.Lock | None = None


async def streaming_server(config: Config, daemons: Any) -> "StreamingServer":
    """The frontend's one streaming server, listening once this returns."""
    global _server, _lock
    if _server is not None:
        return _server
    if _lock is None:
        _lock = asyncio.Lock()
    async with _lock:
        if _server is None:
            from services.frontend.streaming.backend import BusBackend
            from services.frontend.streaming.server import StreamingServer

            server = StreamingServer.from_config(config, BusBackend(daemons))
            await server.start()
            _server = server
    return _server


async def stop_streaming_server() -> None:
    global _server
    if _server is not None:
        await _server.stop()
        _server = None
