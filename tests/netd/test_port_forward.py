"""Port-forward connections into a network namespace (a child enters it and passes the socket back)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from services.netd import port_forward
from shared.errors import FailedPrecondition, InvalidArgument, NotFound

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


async def _http_get(conns: port_forward.Connections, conn_id: str) -> bytes:
    conn = conns.get(conn_id)
    await conn.write(b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n", 5)
    await conn.close_write()
    reply = b""
    while True:
        r = await conn.read(65536, 5)
        reply += r["data"]
        if r["eof"]:
            return reply


async def test_connects_inside_the_namespace(httpd_netns):
    # Not reachable from the host's namespace...
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
    # ...but through the helper it is.
    conns = port_forward.Connections()
    try:
        replies = await asyncio.gather(*[
            _http_get(conns, (await conns.open(httpd_netns, PORT))["conn"]) for _ in range(5)])
        for reply in replies:
            assert reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n")[0]
            assert reply.endswith(b"hello from the pod\n")
    finally:
        await conns.close_all()


async def test_refused_port_and_bad_input(httpd_netns):
    conns = port_forward.Connections()
    with pytest.raises(FailedPrecondition) as refused:
        await conns.open(httpd_netns, PORT + 1)
    assert "refused" in refused.value.message.lower()
    with pytest.raises(InvalidArgument):
        await conns.open(httpd_netns, 70000)
    with pytest.raises(FailedPrecondition):
        await conns.open("/nonexistent/netns", PORT)
    with pytest.raises(NotFound):
        conns.get("nope")


async def test_abandoned_connection_is_closed(httpd_netns):
    conns = port_forward.Connections(idle_timeout=1.0)
    conn_id = (await conns.open(httpd_netns, PORT))["conn"]
    conn = conns.get(conn_id)
    for _ in range(200):
        if conn_id not in conns.conns:
            break
        await asyncio.sleep(0.05)
    assert conn_id not in conns.conns
    assert conn.writer.is_closing()
    await conns.close_all()


async def test_host_network_connects_without_entering_a_namespace():
    async def handle(reader, writer):
        writer.write(b"host side\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conns = port_forward.Connections()
    try:
        conn = conns.get((await conns.open(None, port))["conn"])
        data = b""
        while True:
            r = await conn.read(65536, 5)
            data += r["data"]
            if r["eof"]:
                break
        assert data == b"host side\n"
    finally:
        await conns.close_all()
        server.close()
        await server.wait_closed()
