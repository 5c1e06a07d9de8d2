"""Port-forward connections into a network namespace (a child enters it and passes the socket back), streamed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import AsyncIterator

import pytest

from services.netd import port_forward
from shared.bus.streams import ClientStream, End, StreamListener
from shared.errors import FailedPrecondition, InvalidArgument
from tests.support.stack import root_as_frontend, short_tempdir
from tests.support.streams import read_all

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

PORT = 18080


@pytest.fixture
def httpd_netns(tmp_path: Path):
    """busybox httpd on 127.0.0.1:PORT inside a fresh network namespace; the namespace's path."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from the pod\n")
    proc = subprocess.Popen(
        ["unshare", "--net", "sh", "-c",
         f"ip link set lo up && exec busybox httpd -f -p 127.0.0.1:{PORT} -h {www}"],
        start_new_session=True)
    try:
        path = f"/proc/{proc.pid}/ns/net"
        for _ in range(200):  # until httpd listens inside (its namespace differs from ours)
            if os.path.exists(path) and os.readlink(path) != os.readlink("/proc/self/ns/net") and \
                    _listening(proc.pid):
                break
            subprocess.run(["sleep", "0.05"])
        yield path
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _listening(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/net/tcp").read_text()
    except OSError:
        return False
    return f":{PORT:04X} 00000000:0000 0A" in text


@pytest.fixture
async def streams() -> AsyncIterator[StreamListener]:
    """netd's stream socket, as the daemon runner gives it."""
    base = short_tempdir("pf-")
    listener = StreamListener("netd", base / "netd-streams.sock", config=root_as_frontend())
    await listener.start()
    try:
        yield listener
    finally:
        await listener.close()
        base.rmdir()


async def forward(streams: StreamListener, netns_path: str | None, port: int) -> ClientStream:
    token = await streams.open(port_forward.ForwardedConnection(netns_path, port))
    return await ClientStream.connect("netd", streams.path, token)


async def _http_get(streams: StreamListener, netns_path: str) -> bytes:
    client = await forward(streams, netns_path, PORT)
    try:
        await client.write(b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n")
        await client.end_input()
        out, _err, end = await read_all(client)
        assert end == End()
        return out
    finally:
        await client.close()


async def test_connects_inside_the_namespace(httpd_netns, streams):
    # Not reachable from the host's namespace...
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
    # ...but through the helper it is.
    replies = await asyncio.gather(*[_http_get(streams, httpd_netns) for _ in range(5)])
    for reply in replies:
        assert reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n")[0]
        assert reply.endswith(b"hello from the pod\n")


async def test_refused_port_and_bad_input(httpd_netns, streams):
    with pytest.raises(FailedPrecondition) as refused:
        await streams.open(port_forward.ForwardedConnection(httpd_netns, PORT + 1))
    assert "refused" in refused.value.message.lower()
    with pytest.raises(InvalidArgument):
        await streams.open(port_forward.ForwardedConnection(httpd_netns, 70000))
    with pytest.raises(FailedPrecondition):
        await streams.open(port_forward.ForwardedConnection("/nonexistent/netns", PORT))
    assert streams.sessions == {}


async def test_abandoned_connection_is_closed(httpd_netns, streams):
    streams.claim_timeout = 1.0
    conn = port_forward.ForwardedConnection(httpd_netns, PORT)
    token = await streams.open(conn)
    for _ in range(200):
        if token not in streams.sessions:
            break
        await asyncio.sleep(0.05)
    assert token not in streams.sessions
    assert conn.writer.is_closing()


async def test_frontend_going_away_closes_the_pod_connection(streams):
    closed = asyncio.Event()

    async def handle(reader, writer):
        await reader.read()  # until crio-py's side closes
        closed.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        client = await forward(streams, None, server.sockets[0].getsockname()[1])
        await client.write(b"hello")
        await client.close()
        await asyncio.wait_for(closed.wait(), 10)
        for _ in range(100):
            if not streams.sessions:
                break
            await asyncio.sleep(0.05)
        assert streams.sessions == {}
    finally:
        server.close()
        await server.wait_closed()


async def test_host_network_connects_without_entering_a_namespace(streams):
    async def handle(reader, writer):
        writer.write(b"host side\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await forward(streams, None, port)
        assert await read_all(client) == (b"host side\n", b"", End())
        await client.close()
    finally:
        server.close()
        await server.wait_closed()
