"""shared/forkserver.py: services forked from one process that imported their modules, then handed over."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from typing import Iterator

import pytest

from shared import cli, forkserver
from shared.forkserver import UNKNOWN_EXIT, ForkServer


def fake_main(argv: list[str]) -> int:
    """What the forked children run instead of `criopy`: ["exit", CODE], ["env", NAME] (exits with its value)
    or ["sleep"]."""
    if argv[0] == "exit":
        return int(argv[1])
    if argv[0] == "env":
        return int(os.environ.get(argv[1], "99"))
    time.sleep(600)
    return 0


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ForkServer]:
    # Forked children inherit this process's memory, the stand-in included.
    monkeypatch.setattr(cli, "main", fake_main)
    started = ForkServer.start(preload=("json",))
    try:
        yield started
    finally:
        gc.unfreeze()
        try:
            os.kill(started.pid, signal.SIGKILL)
            os.waitpid(started.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


async def test_services_are_forked_and_their_exit_status_told(server: ForkServer) -> None:
    ok, failing, sleeping = [await server.spawn(argv, {}) for argv in (["exit", "0"], ["exit", "3"], ["sleep"])]
    assert len({ok.pid, failing.pid, sleeping.pid, server.pid, os.getpid()}) == 5
    assert await asyncio.wait_for(ok.wait(), 30) == 0
    assert await asyncio.wait_for(failing.wait(), 30) == 3
    # Each in a process group of its own, as the supervisor starts services.
    assert os.getpgid(sleeping.pid) == sleeping.pid
    sleeping.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(sleeping.wait(), 30) == -signal.SIGTERM
    assert sleeping.returncode == -signal.SIGTERM
    await server.close()


async def test_once_closed_its_services_go_on_and_are_still_watched(server: ForkServer) -> None:
    sleeping = await server.spawn(["sleep"], {})
    await server.close()
    assert not server.alive
    with pytest.raises(ChildProcessError):
        os.waitpid(server.pid, os.WNOHANG)  # the server exited and was reaped
    os.kill(sleeping.pid, 0)  # the service it forked still runs
    with pytest.raises(ConnectionError):
        await server.spawn(["sleep"], {})
    sleeping.kill()
    assert await asyncio.wait_for(sleeping.wait(), 30) == UNKNOWN_EXIT


async def test_a_service_gets_the_environment_it_is_given(server: ForkServer) -> None:
    given = await server.spawn(["env", "CRIOPY_TEST_CODE"], {"CRIOPY_TEST_CODE": "7"})
    assert await asyncio.wait_for(given.wait(), 30) == 7
    # Given to that service alone: the next one forked does not inherit it.
    other = await server.spawn(["env", "CRIOPY_TEST_CODE"], {})
    assert await asyncio.wait_for(other.wait(), 30) == 99
    await server.close()


def test_the_preloaded_modules_include_what_every_service_imports() -> None:
    assert "shared.daemon" in forkserver.COMMON_MODULES
    # The SDK is imported only when tracing is on, by the service that traces.
    assert not any(name.startswith("opentelemetry.sdk") for name in forkserver.COMMON_MODULES)
