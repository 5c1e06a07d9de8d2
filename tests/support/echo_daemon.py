"""A small daemon for bus tests: `python -m tests.support.echo_daemon ENDPOINT`."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from shared.bus.server import BusServer
from shared.bus.service import Service, method
from shared.config import Config
from shared.errors import NotFound, Unavailable


class Echo(Service):
    name = "echo"
    capabilities = frozenset()

    @method(idempotent=True)
    async def echo(self, value: Any) -> Any:
        return value

    @method(idempotent=True)
    async def whoami(self) -> int:
        return os.getpid()

    @method(idempotent=True)
    async def missing(self, what: str) -> None:
        raise NotFound(f"no {what} here")

    @method(idempotent=False)
    async def crash(self) -> None:
        raise ValueError("a bug in the handler")

    @method(idempotent=True)
    async def sleep(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return os.getpid()

    @method(idempotent=False)
    async def sleep_once(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return os.getpid()

    @method(idempotent=True)
    async def busy(self) -> None:
        raise Unavailable("busy: try again")

    @method(idempotent=False)
    async def busy_once(self) -> None:
        raise Unavailable("busy: try again")

    @method(idempotent=False)
    async def unserialisable(self) -> Any:
        return object()


async def serve(endpoint: str, max_message_bytes: int = 1024 * 1024) -> None:
    server = BusServer(Echo(Config()), endpoint, max_message_bytes=max_message_bytes)
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
