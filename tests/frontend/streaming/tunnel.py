"""A local stream whose bytes travel as the binary messages of a WebSocket (SPDY tunnelled in it)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any


async def socket_bridge(ws: Any) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], asyncio.Task]:
    """A stream pair whose other end is copied to and from the WebSocket's binary messages."""
    left, right = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=left)
    r2, w2 = await asyncio.open_connection(sock=right)

    async def pump() -> None:
        async def up() -> None:
            while data := await r2.read(65536):
                await ws.send(data)

        async def down() -> None:
            async for message in ws:
                w2.write(message)
                await w2.drain()

        await asyncio.gather(up(), down())

    return (reader, writer), asyncio.create_task(pump())
