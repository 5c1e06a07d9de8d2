"""The bus: round trips, typed errors, hostile frames, deadlines, and a daemon that dies or is absent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import AsyncIterator

import msgpack
import pytest
import zmq
import zmq.asyncio

from shared import errors, metrics, tracing
from shared.bus.api import FRONTEND, ROOT, ServiceApi, once, retried
from shared.bus.client import BusClient
from shared.bus.envelope import PROTOCOL_VERSION, Request
from shared.bus.ipc import SocketInUse
from shared.bus.server import BusServer
from shared.bus.service import Service, method
from shared.config import Config, TracingConfig
from tests.support.echo_daemon import Echo
from tests.support.stack import REPO, short_tempdir

metrics.enable()  # the counts these tests read exist with metrics on

MAX_BYTES = 64 * 1024


@pytest.fixture
def endpoint() -> AsyncIterator[str]:
    base = short_tempdir("bus-")
    yield f"ipc://{base}/echo.sock"
    for p in base.iterdir():
        p.unlink()
    base.rmdir()


@pytest.fixture
async def server(endpoint: str) -> AsyncIterator[BusServer]:
    srv = BusServer(Echo(Config()), endpoint, max_message_bytes=MAX_BYTES)
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def client(endpoint: str) -> AsyncIterator[BusClient]:
    c = BusClient("echo", endpoint, Echo.api.methods)
    c.connect()
    yield c
    await c.close()


def soon(seconds: float = 5.0) -> float:
    return time.time() + seconds


async def test_round_trip_keeps_types(server: BusServer, client: BusClient) -> None:
    value = {"s": "text", "i": 42, "f": 1.5, "b": b"\x00\xff", "l": [1, None, True], "m": {"k": "v"}}
    assert await client.call("echo", deadline=soon(), value=value) == value


async def test_health_reports_the_service(server: BusServer, client: BusClient) -> None:
    health = await client.call("health", deadline=soon())
    assert health["service"] == "echo"
    assert health["pid"] == os.getpid()
    assert health["version"]


async def test_typed_error_comes_back_typed(server: BusServer, client: BusClient) -> None:
    with pytest.raises(errors.NotFound, match="no pod here"):
        await client.call("missing", deadline=soon(), what="pod")


async def test_handler_bug_is_internal_and_daemon_survives(server: BusServer, client: BusClient) -> None:
    with pytest.raises(errors.Internal, match="a bug in the handler"):
        await client.call("crash", deadline=soon())
    with pytest.raises(errors.Internal, match="could not be encoded"):
        await client.call("unserialisable", deadline=soon())
    assert await client.call("echo", deadline=soon(), value=1) == 1


async def test_unknown_method_is_unimplemented(server: BusServer, client: BusClient) -> None:
    with pytest.raises(errors.Unimplemented, match="echo does not implement 'nope'"):
        await client.call("nope", deadline=soon())


async def test_bad_params_are_invalid_argument(server: BusServer, client: BusClient) -> None:
    with pytest.raises(errors.InvalidArgument, match="bad params"):
        await client.call("echo", deadline=soon(), wrong=1)
    with pytest.raises(errors.InvalidArgument, match="bad params"):
        await client.call("echo", deadline=soon())


async def _raw_exchange(endpoint: str, frames: list[bytes], expect_reply: bool) -> dict | None:
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart(frames)
        if await sock.poll(1000 if expect_reply else 300) == 0:
            return None
        return msgpack.unpackb((await sock.recv_multipart())[-1], raw=False)
    finally:
        sock.close()


def _request(**overrides: object) -> dict:
    body = {"v": PROTOCOL_VERSION, "id": "r1", "method": "echo", "params": {"value": 1},
            "deadline": soon(), "traceparent": None}
    body.update(overrides)
    return body


@pytest.mark.parametrize("body, message", [
    (_request(v=99), "unsupported protocol version 99"),
    (_request(method=7), "without a method name"),
    (_request(params=[1, 2]), "params must be a map"),
    (_request(deadline="soon"), "numeric deadline"),
])
async def test_malformed_request_with_id_gets_error_reply(server: BusServer, client: BusClient,
                                                          endpoint: str, body: dict, message: str) -> None:
    reply = await _raw_exchange(endpoint, [msgpack.packb(body)], expect_reply=True)
    assert reply is not None and reply["id"] == "r1"
    assert reply["error"]["code"] == "INVALID_ARGUMENT"
    assert message in reply["error"]["message"]
    assert await client.call("echo", deadline=soon(), value="still up") == "still up"


@pytest.mark.parametrize("frames", [
    [b"\xc1 not msgpack"],
    [msgpack.packb([1, 2, 3])],
    [msgpack.packb({"method": "echo"})],
    [b"one", b"two", b"three"],
])
async def test_garbage_without_id_is_dropped_and_daemon_survives(server: BusServer, client: BusClient,
                                                                 endpoint: str, frames: list[bytes]) -> None:
    assert await _raw_exchange(endpoint, frames, expect_reply=False) is None
    assert await client.call("echo", deadline=soon(), value="still up") == "still up"


async def test_huge_message_is_refused(server: BusServer, client: BusClient) -> None:
    with pytest.raises(errors.ResourceExhausted, match="exceeds the limit"):
        await client.call("echo", deadline=soon(), value="x" * (MAX_BYTES + 1))
    assert await client.call("echo", deadline=soon(), value="small") == "small"


async def test_expired_deadline_on_arrival(server: BusServer, endpoint: str) -> None:
    late = Request(method="echo", params={"value": 1}, deadline=time.time() - 1, id="late")
    reply = await _raw_exchange(endpoint, [late.encode()], expect_reply=True)
    assert reply is not None and reply["error"]["code"] == "DEADLINE_EXCEEDED"


async def test_slow_method_ends_at_the_deadline_as_deadline_exceeded(server: BusServer, client: BusClient) -> None:
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded, match="echo.sleep did not complete before the caller's deadline"):
        await client.call("sleep", deadline=time.time() + 0.5, seconds=10)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("budget", [0.0, 0.001, 0.05])
async def test_a_deadline_too_short_for_any_answer_is_deadline_exceeded(server: BusServer, client: BusClient,
                                                                        budget: float) -> None:
    for _ in range(5):
        with pytest.raises(errors.DeadlineExceeded):
            await client.call("sleep", deadline=time.time() + budget, seconds=1)


async def test_daemon_down_until_the_deadline_is_deadline_exceeded(endpoint: str, client: BusClient) -> None:
    # Retried all along (a restarting daemon is back within a second or so); when the
    # caller's deadline passes, the answer says so, and what the call was waiting on.
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded, match="echo is not connected") as e:
        await client.call("echo", deadline=time.time() + 0.7, value=1)
    assert not isinstance(e.value, errors.Unavailable)
    assert 0.5 < time.monotonic() - started < 3


async def test_daemon_busy_until_the_deadline_is_deadline_exceeded(server: BusServer, client: BusClient) -> None:
    # An idempotent call is retried while the daemon answers a retriable error; the deadline ends it.
    with pytest.raises(errors.DeadlineExceeded, match="busy: try again"):
        await client.call("busy", deadline=time.time() + 0.5)
    # A call that may not be repeated gets the daemon's answer at once.
    with pytest.raises(errors.Unavailable, match="busy: try again"):
        await client.call("busy_once", deadline=soon())


async def _late_server(endpoint: str, delay: float) -> BusServer:
    await asyncio.sleep(delay)
    srv = BusServer(Echo(Config()), endpoint, max_message_bytes=MAX_BYTES)
    await srv.start()
    return srv


async def test_call_waits_for_a_daemon_that_comes_up(endpoint: str, client: BusClient) -> None:
    starter = asyncio.create_task(_late_server(endpoint, 0.5))
    assert await client.call("echo", deadline=soon(), value="late") == "late"
    await (await starter).close()


async def test_the_call_span_counts_its_attempts(endpoint: str, client: BusClient,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    tracing.configure("test", TracingConfig(enable_tracing=True, tracing_exporter="console"))
    try:
        starter = asyncio.create_task(_late_server(endpoint, 0.3))
        assert await client.call("echo", deadline=soon(), value="late") == "late"
        assert await client.call("echo", deadline=soon(), value="again") == "again"
        await (await starter).close()
    finally:
        tracing.configure("test", TracingConfig())
    spans = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    attempts = [s["attributes"]["criopy.bus.attempts"] for s in spans if s["name"] == "bus echo.echo"]
    assert len(attempts) == 2
    assert attempts[0] > 1 and attempts[1] == 1


async def test_concurrent_calls_are_served_concurrently(server: BusServer, client: BusClient) -> None:
    started = time.monotonic()
    results = await asyncio.gather(*(client.call("sleep", deadline=soon(), seconds=0.3) for _ in range(20)))
    assert results == [os.getpid()] * 20
    assert time.monotonic() - started < 3


# -- callers checked against the table -------------------------------------


class Guarded(Service):
    """`touch` is the frontend's alone; root (this test) may only `peek`."""

    api = ServiceApi("guarded", {"health": retried(FRONTEND), "metrics": retried(FRONTEND),
                                 "touch": once(FRONTEND), "peek": retried(ROOT)})

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.touched = 0

    @method
    async def touch(self) -> None:
        self.touched += 1

    @method
    async def peek(self) -> int:
        return self.touched


class Closed(Service):
    """Nothing here is root's."""

    api = ServiceApi("closed", {"health": retried(FRONTEND), "metrics": retried(FRONTEND)})


def refusals(caller: str) -> float:
    return metrics.BUS_REFUSED.labels("call", caller)._value.get()


async def test_a_method_refuses_a_caller_it_does_not_list_and_never_runs(endpoint: str) -> None:
    service = Guarded(Config())
    server = BusServer(service, endpoint, max_message_bytes=MAX_BYTES)
    await server.start()
    client = BusClient("guarded", endpoint, Guarded.api.methods)
    client.connect()
    before = refusals("root")
    try:
        with pytest.raises(errors.PermissionDenied, match=rf"root \(uid 0 gid 0 pid {os.getpid()}\) may not call "
                                                          r"guarded.touch"):
            await client.call("touch", deadline=soon())
        assert await client.call("peek", deadline=soon()) == 0
        assert service.touched == 0
        assert refusals("root") == before + 1
    finally:
        await client.close()
        await server.close()


async def test_a_caller_of_nothing_is_refused_before_its_message_is_read(endpoint: str) -> None:
    server = BusServer(Closed(Config()), endpoint, max_message_bytes=MAX_BYTES)
    await server.start()
    try:
        reply = await _raw_exchange(endpoint, [msgpack.packb(_request(method="no_such_method"))], expect_reply=True)
        assert reply is not None and reply["error"]["code"] == "PERMISSION_DENIED"
        assert "may not call closed.anything" in reply["error"]["message"]
    finally:
        await server.close()


async def test_a_socket_still_served_is_never_taken_over(server: BusServer, client: BusClient, endpoint: str) -> None:
    inode = os.stat(endpoint.removeprefix("ipc://")).st_ino
    second = BusServer(Echo(Config()), endpoint, max_message_bytes=MAX_BYTES)
    with pytest.raises(SocketInUse, match="served by another process"):
        await second.start()
    await second.close()
    assert os.stat(endpoint.removeprefix("ipc://")).st_ino == inode
    assert await client.call("echo", deadline=soon(), value="first") == "first"


# -- a daemon process killed with SIGKILL mid-call -------------------------


def _spawn_daemon(endpoint: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.support.echo_daemon", endpoint], cwd=REPO)


@pytest.fixture
def daemons(endpoint: str):  # type: ignore[no-untyped-def]
    started: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        proc = _spawn_daemon(endpoint)
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def test_idempotent_call_survives_a_daemon_restart(client: BusClient, daemons) -> None:  # type: ignore[no-untyped-def]
    first = daemons()
    assert await client.call("whoami", deadline=soon(10)) == first.pid
    call = asyncio.create_task(client.call("sleep", deadline=soon(15), seconds=1.0))
    await asyncio.sleep(0.4)
    first.send_signal(signal.SIGKILL)
    await asyncio.sleep(0.5)
    second = daemons()
    assert await call == second.pid


async def test_non_idempotent_call_is_not_retried_after_delivery(client: BusClient, daemons) -> None:  # type: ignore[no-untyped-def]
    first = daemons()
    assert await client.call("whoami", deadline=soon(10)) == first.pid
    call = asyncio.create_task(client.call("sleep_once", deadline=soon(10), seconds=2.0))
    await asyncio.sleep(0.4)
    first.send_signal(signal.SIGKILL)
    with pytest.raises(errors.Unavailable, match="not safe to retry"):
        await call


async def test_call_during_outage_never_outlives_its_deadline(client: BusClient, daemons) -> None:  # type: ignore[no-untyped-def]
    first = daemons()
    assert await client.call("whoami", deadline=soon(10)) == first.pid
    first.send_signal(signal.SIGKILL)
    first.wait()
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded, match="echo is not connected"):
        await client.call("whoami", deadline=time.time() + 1.0)
    assert time.monotonic() - started < 2.5
