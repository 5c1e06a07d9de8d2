"""A small daemon for bus tests: `python -m tests.support.echo_daemon ENDPOINT`."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from shared.bus.api import ServiceApi, once, retried
from shared.bus.server import BusServer
from shared.bus.service import Service, method
from shared.config import Config
from shared.errors import NotFound, Unavailable

CALLER = "root"

ECHO_API = ServiceApi("echo", {
    "health": retried(CALLER), "metrics": retried(CALLER),
    "echo": retried(CALLER), "whoami": retried(CALLER), "missing": retried(CALLER),
    "crash": once(CALLER), "sleep": retried(CALLER), "sleep_once": once(CALLER),
    "busy": retried(CALLER), "busy_once": once(CALLER), "unserialisable": once(CALLER),
})


class Echo(Service):
    api = ECHO_API
    capabilities = frozenset()

    @method
    async def echo(self, value: Any) -> Any:
        return value

    @method
    async def whoami(self) -> int:
        return os.getpid()

    @method
    async def missing(self, what: str) -> None:
        raise NotFound(f"no {what} here")

    @method
    async def crash(self) -> None:
        raise ValueError("a bug in the handler")

    @method
    async def sleep(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return os.getpid()

    @method
    async def sleep_once(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return os.getpid()

    @method
    async def busy(self) -> None:
        raise Unavailable("busy: try again")

    @method
    async def busy_once(self) -> None:
        raise Unavailable("busy: try again")

    @method
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
