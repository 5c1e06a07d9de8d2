"""Streams between the frontend and a daemon: frames, credit, back-pressure and every way a session ends."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import AsyncIterator

import pytest

from shared.bus import streams
from shared.bus.streams import STDERR, STDIN, STDOUT, ClientStream, DaemonStream, End, StreamListener
from shared.errors import ResourceExhausted, Unavailable
from tests.support.stack import root_as_frontend, short_tempdir
from tests.support.streams import read_all

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A session the test drives: it sends what it is handed, and records its input and resizes."""

    kind = "test"

    def __init__(self, *, consume: bool = True, fail_start: bool = False) -> None:
        self.consume = consume
        self.fail_start = fail_start
        self.outputs: asyncio.Queue[tuple[int, bytes] | End] = asyncio.Queue()
        self.inputs: list[bytes] = []
        self.input_ended = asyncio.Event()
        self.resizes: list[tuple[int, int]] = []
        self.serving = asyncio.Event()
        self.cancelled = False
        self.closed = asyncio.Event()
        self.sent = 0
        self.stream: DaemonStream | None = None

    async def start(self) -> None:
        if self.fail_start:
            raise Unavailable("cannot start")

    async def serve(self, stream: DaemonStream) -> End:
        self.stream = stream
        self.serving.set()
        feeder = asyncio.create_task(self._feed(stream)) if self.consume else None
        try:
            while True:
                item = await self.outputs.get()
                if isinstance(item, End):
                    return item
                await stream.send(*item)
                self.sent += len(item[1])
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            if feeder is not None:
                feeder.cancel()

    async def _feed(self, stream: DaemonStream) -> None:
        while data := await stream.receive():
            self.inputs.append(data)
        self.input_ended.set()

    def resize(self, width: int, height: int) -> None:
        self.resizes.append((width, height))

    async def close(self) -> None:
        self.closed.set()


@pytest.fixture
async def listener() -> AsyncIterator[StreamListener]:
    base = short_tempdir("streams-")
    srv = StreamListener("testd", base / "bus" / "testd-streams.sock", config=root_as_frontend(), max_streams=3,
                         claim_timeout=30)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()
        for p in sorted(base.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        base.rmdir()


async def connect(listener: StreamListener, token: str) -> ClientStream:
    return await ClientStream.connect("testd", listener.path, token)


async def until(condition, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_output_input_resize_and_end(listener: StreamListener) -> None:
    session = Recorder()
    token = (await listener.open(session))
    assert listener.sessions == {token: session}
    client = await connect(listener, token)
    await client.write(b"typed")
    await client.resize(80, 24)
    await client.end_input()
    await session.input_ended.wait()
    for item in ((STDOUT, b"out"), (STDERR, b"err"), (STDOUT, b"more"), End(exit_code=3)):
        session.outputs.put_nowait(item)
    assert await read_all(client) == (b"outmore", b"err", End(exit_code=3))
    assert session.inputs == [b"typed"] and session.resizes == [(80, 24)]
    await asyncio.wait_for(session.closed.wait(), 5)
    assert listener.sessions == {}
    await client.close()


async def test_large_transfers_both_ways(listener: StreamListener) -> None:
    session = Recorder()
    client = await connect(listener, await listener.open(session))
    payload = os.urandom(3 * streams.INPUT_WINDOW + 12345)  # needs the daemon's credit several times over
    writer = asyncio.create_task(client.write(payload))
    for at in range(0, len(payload), 300_000):
        session.outputs.put_nowait((STDOUT, payload[at:at + 300_000]))
    reading = asyncio.create_task(read_all(client))
    await writer
    await until(lambda: sum(map(len, session.inputs)) == len(payload), "all input")
    session.outputs.put_nowait(End(exit_code=0))
    out, _err, end = await reading
    assert out == payload and b"".join(session.inputs) == payload and end == End(exit_code=0)
    await client.close()


async def test_input_is_bounded_and_control_still_flows(listener: StreamListener) -> None:
    session = Recorder(consume=False)  # a process that never reads its stdin
    client = await connect(listener, await listener.open(session))
    writer = asyncio.create_task(client.write(b"x" * (4 * streams.INPUT_WINDOW)))
    await session.serving.wait()
    assert session.stream is not None
    await until(lambda: sum(map(len, session.stream._input)) == streams.INPUT_WINDOW, "a full window")
    await asyncio.sleep(0.3)
    # The daemon holds one window of input and no more; the frontend waits for credit.
    assert sum(map(len, session.stream._input)) == streams.INPUT_WINDOW
    assert not writer.done()
    # Control frames are not stuck behind the input...
    await client.resize(100, 40)
    await until(lambda: session.resizes == [(100, 40)], "the resize")
    # ...nor is the frontend's going away.
    writer.cancel()
    await client.close()
    await asyncio.wait_for(session.closed.wait(), 5)
    assert session.cancelled and listener.sessions == {}


async def test_a_reader_that_stops_stops_the_sender(listener: StreamListener) -> None:
    session = Recorder()
    client = await connect(listener, await listener.open(session))
    chunk = b"y" * 256 * 1024
    for _ in range(400):  # 100 MiB, far more than any buffer on the way
        session.outputs.put_nowait((STDOUT, chunk))
    await until(lambda: session.sent > 0, "output")
    last, same = -1, 0
    while same < 20:  # until the sender is blocked
        await asyncio.sleep(0.05)
        same = same + 1 if session.sent == last else 0
        last = session.sent
    assert last < 16 * 1024 * 1024, last
    got = 0
    while got < 8 * 1024 * 1024:  # reading again lets it go on
        kind, data = await client.read()
        got += len(data)
    await until(lambda: session.sent > last, "more output")
    await client.close()


async def test_frontend_going_away_ends_the_session(listener: StreamListener) -> None:
    session = Recorder()
    client = await connect(listener, await listener.open(session))
    await session.serving.wait()
    await client.close()
    await asyncio.wait_for(session.closed.wait(), 5)
    assert session.cancelled and listener.sessions == {}


async def test_unclaimed_session_is_ended_and_a_token_serves_once(listener: StreamListener) -> None:
    listener.claim_timeout = 0.2
    abandoned = Recorder()
    token = await listener.open(abandoned)
    await asyncio.wait_for(abandoned.closed.wait(), 5)
    assert listener.sessions == {}
    late = await connect(listener, token)
    end = await late.read()
    assert isinstance(end, End) and "not found" in end.error
    await late.close()

    listener.claim_timeout = 30
    session = Recorder()
    token = await listener.open(session)
    first = await connect(listener, token)
    await session.serving.wait()
    second = await connect(listener, token)
    end = await second.read()
    assert isinstance(end, End) and "not found" in end.error
    assert not session.closed.is_set()
    for client in (first, second):
        await client.close()


async def test_stopping_the_daemon_ends_every_session(listener: StreamListener) -> None:
    connected, waiting = Recorder(), Recorder()
    client = await connect(listener, await listener.open(connected))
    await listener.open(waiting)
    await connected.serving.wait()
    await listener.close()
    end = await client.read()
    assert isinstance(end, End) and end.exit_code is None and "stopped" in end.error
    assert connected.cancelled and connected.closed.is_set() and waiting.closed.is_set()
    assert not listener.path.exists()
    await client.close()


async def test_a_daemon_that_dies_is_reported(tmp_path: Path) -> None:
    path = short_tempdir("streams-") / "s.sock"

    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await streams.read_frame(reader)
        writer.transport.abort()  # as the kernel closes a killed daemon's sockets

    server = await asyncio.start_unix_server(die, path=str(path))
    try:
        client = await ClientStream.connect("testd", path, "token")
        with pytest.raises(Unavailable, match="went away"):
            await client.read()
        with pytest.raises(ConnectionResetError):
            await client.write(b"more")
        await client.close()
    finally:
        server.close()
        await server.wait_closed()
        path.unlink()
        path.parent.rmdir()
    with pytest.raises(Unavailable, match="cannot reach"):
        await ClientStream.connect("testd", path, "token")


async def test_the_cap_and_failed_starts(listener: StreamListener) -> None:
    failing = Recorder(fail_start=True)
    with pytest.raises(Unavailable):
        await listener.open(failing)
    assert failing.closed.is_set() and listener.sessions == {}
    for _ in range(listener.max_streams):
        await listener.open(Recorder())
    with pytest.raises(ResourceExhausted):
        await listener.open(Recorder())


async def test_only_owner_and_group_may_connect(listener: StreamListener) -> None:
    assert stat.S_IMODE(listener.path.stat().st_mode) == 0o660


async def test_input_beyond_the_credit_breaks_the_stream(listener: StreamListener) -> None:
    session = Recorder(consume=False)
    token = await listener.open(session)
    reader, writer = await asyncio.open_unix_connection(str(listener.path))
    writer.write(streams.frame(streams.OPEN, token.encode()))
    chunk = streams.frame(STDIN, b"z" * streams.MAX_FRAME)
    for _ in range(streams.INPUT_WINDOW // streams.MAX_FRAME + 1):
        writer.write(chunk)
    await writer.drain()
    await asyncio.wait_for(session.closed.wait(), 5)
    assert session.cancelled
    writer.close()
