"""The streaming server against an in-process backend: SPDY and WebSocket, exec, attach, port-forward."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from services.frontend.streaming.server import StreamingServer
from services.frontend.streaming.tokens import TokenStore
from tests.frontend.streaming.fake_backend import FakeBackend
from tests.frontend.streaming.spdy_client import SpdyClient, UpgradeRefused
from tests.frontend.streaming.tunnel import WebSocketTunnel

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def server():
    backend = FakeBackend()
    srv = StreamingServer(backend)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()
        for s in backend.sessions:
            await s.close()


def exec_url(server, cmd, *, stdin=False, stdout=True, stderr=True, tty=False, container="c1"):
    return server.url("exec", {"container_id": container, "cmd": cmd, "stdin": stdin, "stdout": stdout,
                               "stderr": stderr, "tty": tty})


async def spdy_exec(url, *, stdin=False, stdout=True, stderr=True, tty=False, protocol="v4.channel.k8s.io"):
    client = await SpdyClient.connect(url, [protocol])
    streams = {"error": await client.open_stream({"streamType": "error"})}
    await streams["error"].close()  # the client only reads the error stream
    if stdin:
        streams["stdin"] = await client.open_stream({"streamType": "stdin"})
    if stdout:
        streams["stdout"] = await client.open_stream({"streamType": "stdout"})
    if stderr and not tty:
        streams["stderr"] = await client.open_stream({"streamType": "stderr"})
    if tty:
        streams["resize"] = await client.open_stream({"streamType": "resize"})
    return client, streams


async def test_spdy_exec_reports_output_and_exit_code(server):
    url = exec_url(server, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    client, s = await spdy_exec(url)
    try:
        out, err, status = await asyncio.gather(s["stdout"].read_all(), s["stderr"].read_all(),
                                                s["error"].read_all())
        assert out == b"out\n"
        assert err == b"err\n"
        st = json.loads(status)
        assert st["status"] == "Failure"
        assert st["reason"] == "NonZeroExitCode"
        assert st["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    finally:
        await client.close()


async def test_spdy_exec_success_and_stdin(server):
    url = exec_url(server, ["cat"], stdin=True, stderr=False)
    client, s = await spdy_exec(url, stdin=True, stderr=False)
    try:
        await s["stdin"].write(b"hello ")
        await s["stdin"].write(b"world")
        await s["stdin"].close()
        out = await s["stdout"].read_all()
        assert out == b"hello world"
        assert json.loads(await s["error"].read_all()) == {"metadata": {}, "status": "Success"}
    finally:
        await client.close()


async def test_spdy_v1_protocol_reports_failure_as_text(server):
    url = exec_url(server, ["sh", "-c", "exit 2"], stderr=False)
    client, s = await spdy_exec(url, stderr=False, protocol="channel.k8s.io")
    try:
        assert client.protocol == "channel.k8s.io"
        await s["stdout"].read_all()
        text = (await s["error"].read_all()).decode()
        assert "exit code 2" in text and not text.startswith("{")
    finally:
        await client.close()


async def test_spdy_tty_resize_reaches_the_terminal(server):
    script = 'while [ "$(stty size)" != "33 101" ]; do sleep 0.05; done; echo resized'
    url = exec_url(server, ["sh", "-c", script], tty=True, stderr=False)
    client, s = await spdy_exec(url, tty=True, stderr=False)
    try:
        await s["resize"].write(json.dumps({"Width": 80, "Height": 24}).encode())
        await s["resize"].write(b'{"Width":101,')  # split across frames
        await s["resize"].write(b'"Height":33}')
        out = await s["stdout"].read_all()
        assert b"resized" in out
        assert json.loads(await s["error"].read_all())["status"] == "Success"
    finally:
        await client.close()


async def test_token_is_single_use(server):
    url = exec_url(server, ["true"], stderr=False)
    client, s = await spdy_exec(url, stderr=False)
    await s["error"].read_all()
    await client.close()
    with pytest.raises(UpgradeRefused) as refused:
        await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    assert refused.value.status == 404


async def test_unknown_and_expired_tokens_are_refused():
    now = [1000.0]
    srv = StreamingServer(FakeBackend(), tokens=TokenStore(ttl=30, clock=lambda: now[0]))
    await srv.start()
    try:
        url = exec_url(srv, ["true"])
        now[0] += 31
        with pytest.raises(UpgradeRefused) as expired:
            await SpdyClient.connect(url, ["v4.channel.k8s.io"])
        assert expired.value.status == 404
        with pytest.raises(UpgradeRefused) as unknown:
            await SpdyClient.connect(srv.base_url + "/exec/not-a-token", ["v4.channel.k8s.io"])
        assert unknown.value.status == 404
        # A token for exec does not open an attach.
        url = exec_url(srv, ["true"])
        token = url.rsplit("/", 1)[1]
        with pytest.raises(UpgradeRefused) as wrong:
            await SpdyClient.connect(f"{srv.base_url}/attach/{token}", ["v4.channel.k8s.io"])
        assert wrong.value.status == 404
    finally:
        await srv.stop()


async def test_unknown_protocol_is_refused(server):
    url = exec_url(server, ["true"])
    with pytest.raises(UpgradeRefused) as refused:
        await SpdyClient.connect(url, ["v9.channel.k8s.io"])
    assert refused.value.status == 403


async def test_failed_session_start_is_reported_on_the_error_stream(server):
    url = exec_url(server, ["true"], container="missing", stderr=False)
    client, s = await spdy_exec(url, stderr=False)
    try:
        st = json.loads(await s["error"].read_all())
        assert st["status"] == "Failure" and "not found" in st["message"]
    finally:
        await client.close()


async def test_spdy_flow_control_is_honoured_when_the_client_uses_it(server):
    size = 300_000
    url = exec_url(server, ["head", "-c", str(size), "/dev/zero"], stderr=False)
    client = await SpdyClient.connect(url, ["v4.channel.k8s.io"], flow_control=True)
    try:
        error = await client.open_stream({"streamType": "error"})
        stdout = await client.open_stream({"streamType": "stdout"})
        received, granted = 0, 65536
        while True:
            chunk = await stdout.read()
            if not chunk:
                break
            received += len(chunk)
            assert received <= granted  # the server never overran our window
            if granted - received < 16384:
                client.send(struct.pack(">HHI", 0x8003, 9, 8) + struct.pack(">II", stdout.id, 65536))
                client.send(struct.pack(">HHI", 0x8003, 9, 8) + struct.pack(">II", 0, 65536))
                granted += 65536
        assert received == size
        assert json.loads(await error.read_all())["status"] == "Success"
    finally:
        await client.close()


async def pings_answered(client, ping_id):
    """The ping ids the server echoed, once it echoed any after sending `ping_id`."""
    await client.ping(ping_id)
    for _ in range(200):
        if client.pings:
            break
        await asyncio.sleep(0.01)
    return client.pings


async def test_spdy_ping_is_answered(server):
    url = exec_url(server, ["sleep", "30"], stderr=False)
    client, s = await spdy_exec(url, stderr=False)
    try:
        assert await pings_answered(client, 7) == [7]
    finally:
        await client.close()


async def test_client_disconnect_ends_the_session(server):
    url = exec_url(server, ["sleep", "300"], stderr=False)
    client, s = await spdy_exec(url, stderr=False)
    for _ in range(500):
        if server.backend.sessions:
            break
        await asyncio.sleep(0.01)
    session = server.backend.sessions[0]
    await client.close()
    await asyncio.wait_for(session.proc.wait(), 10)
    for _ in range(500):
        if session.closed:
            break
        await asyncio.sleep(0.01)
    assert session.closed


# -- WebSocket --------------------------------------------------------------


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://", 1)


async def ws_collect(ws):
    out = {1: b"", 2: b"", 3: b""}
    async for message in ws:
        assert isinstance(message, bytes)
        channel, data = message[0], message[1:]
        out[channel] = out.get(channel, b"") + data
    return out


async def test_websocket_v5_exec_with_stdin_close_signal(server):
    url = exec_url(server, ["cat"], stdin=True, stderr=False)
    async with ws_connect(ws_url(url), subprotocols=["v5.channel.k8s.io", "v4.channel.k8s.io"]) as ws:
        assert ws.subprotocol == "v5.channel.k8s.io"
        first = await ws.recv()
        assert first == b"\x01"  # the server's hello on stdout
        await ws.send(b"\x00ping")
        await ws.send(bytes([255, 0]))  # close stdin
        out = await ws_collect(ws)
    assert out[1] == b"ping"
    assert json.loads(out[3])["status"] == "Success"


async def test_websocket_v4_exec_exit_code(server):
    url = exec_url(server, ["sh", "-c", "echo hi; echo oops >&2; exit 5"])
    async with ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"]) as ws:
        out = await ws_collect(ws)
    assert out[1] == b"hi\n" and out[2] == b"oops\n"
    st = json.loads(out[3])
    assert st["reason"] == "NonZeroExitCode" and st["details"]["causes"][0]["message"] == "5"


async def test_websocket_base64_exec(server):
    url = exec_url(server, ["echo", "text"], stderr=False)
    async with ws_connect(ws_url(url), subprotocols=["v4.base64.channel.k8s.io"]) as ws:
        messages = [m async for m in ws]
    assert all(isinstance(m, str) for m in messages)
    stdout = b"".join(base64.b64decode(m[1:]) for m in messages if m[0] == "1")
    assert stdout == b"text\n"
    assert any(m[0] == "3" and json.loads(base64.b64decode(m[1:]))["status"] == "Success" for m in messages)


async def test_websocket_tty_resize(server):
    script = 'while [ "$(stty size)" != "40 120" ]; do sleep 0.05; done; echo resized'
    url = exec_url(server, ["sh", "-c", script], tty=True, stderr=False)
    async with ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"]) as ws:
        await ws.send(b"\x04" + json.dumps({"Width": 120, "Height": 40}).encode())
        out = await ws_collect(ws)
    assert b"resized" in out[1]


async def test_websocket_token_reuse_refused(server):
    url = exec_url(server, ["true"], stderr=False)
    async with ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"]) as ws:
        await ws_collect(ws)
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"]):
            pass
    assert refused.value.response.status_code == 404


async def test_attach_over_websocket(server):
    url = server.url("attach", {"container_id": "c1", "stdin": True, "stdout": True, "stderr": False,
                                "tty": False})
    async with ws_connect(ws_url(url), subprotocols=["v5.channel.k8s.io"]) as ws:
        await ws.recv()
        await ws.send(b"\x00echo me")
        await ws.send(bytes([255, 0]))
        out = await ws_collect(ws)
    assert out[1] == b"echo me"


# -- port forward -------------------------------------------------------------


@pytest.fixture
async def echo_server():
    async def handle(reader, writer):
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


async def spdy_forward(client, port, request_id, payload):
    error = await client.open_stream({"streamType": "error", "port": str(port), "requestID": str(request_id)})
    await error.close()
    data = await client.open_stream({"streamType": "data", "port": str(port), "requestID": str(request_id)})
    await data.write(payload)
    await data.close()
    return await data.read_all(), await error.read_all()


async def test_spdy_port_forward_many_connections(server, echo_server):
    url = server.url("portforward", {"pod_id": "p1"})
    client = await SpdyClient.connect(url, ["portforward.k8s.io"])
    try:
        results = await asyncio.gather(*(spdy_forward(client, echo_server, i, f"conn {i} ".encode() * 1000)
                                         for i in range(8)))
        for i, (data, error) in enumerate(results):
            assert data == f"CONN {i} ".encode() * 1000
            assert error == b""
    finally:
        await client.close()


async def test_spdy_port_forward_refused_port_reports_error(server):
    url = server.url("portforward", {"pod_id": "p1"})
    client = await SpdyClient.connect(url, ["portforward.k8s.io"])
    try:
        _data, error = await spdy_forward(client, 1, 1, b"x")
        assert b"error forwarding port 1" in error
    finally:
        await client.close()


async def test_websocket_port_forward_channels(server, echo_server):
    url = server.url("portforward", {"pod_id": "p1"}) + f"?port={echo_server}"
    async with ws_connect(ws_url(url), subprotocols=["v4.channel.k8s.io"]) as ws:
        prefix = struct.pack("<H", echo_server)
        got = {await ws.recv(), await ws.recv()}
        assert got == {b"\x00" + prefix, b"\x01" + prefix}
        await ws.send(b"\x00hello")
        reply = b""
        while len(reply) < 5:
            message = await ws.recv()
            assert message[0] == 0
            reply += message[1:]
        assert reply == b"HELLO"


TUNNEL = "SPDY/3.1+portforward.k8s.io"


@pytest.mark.parametrize("subprotocol,split", [(TUNNEL, 0), (TUNNEL, 5), ("v2.portforward.k8s.io", 0)])
async def test_spdy_tunnelled_in_a_websocket_forwards_ports(server, echo_server, subprotocol, split):
    # split=5: SPDY frames cut across messages, as client-go's tunnel writes them.
    url = server.url("portforward", {"pod_id": "p1"})
    tunnel = await WebSocketTunnel.connect(url, ["v9.nonsense.k8s.io", subprotocol], split=split)
    assert tunnel.subprotocol == subprotocol
    client = SpdyClient(tunnel, "portforward.k8s.io")
    try:
        payloads = [bytes([97 + i]) * 70_000 for i in range(3)]  # past a SPDY window each
        results = await asyncio.gather(*(spdy_forward(client, echo_server, i, p) for i, p in enumerate(payloads)))
        assert results == [(p.upper(), b"") for p in payloads]
        assert await pings_answered(client, 9) == [9]
    finally:
        await client.close()


async def test_tunnel_offer_on_its_own_header_lines_is_understood(server, echo_server):
    url = server.url("portforward", {"pod_id": "p1"})
    # One offer per header line, each a name the token grammar refuses.
    tunnel = await WebSocketTunnel.connect(url, [], extra_headers=[("Sec-WebSocket-Protocol", "SPDY/3.1+x.k8s.io"),
                                                                   ("Sec-WebSocket-Protocol", TUNNEL)])
    assert tunnel.headers["sec-websocket-protocol"] == TUNNEL
    client = SpdyClient(tunnel, "portforward.k8s.io")
    try:
        assert await spdy_forward(client, echo_server, 1, b"lines") == (b"LINES", b"")
    finally:
        await client.close()


async def test_unknown_websocket_subprotocols_are_refused(server):
    url = server.url("portforward", {"pod_id": "p1"})
    with pytest.raises(UpgradeRefused) as refused:
        await WebSocketTunnel.connect(url, ["SPDY/3.1+v9.portforward.k8s.io"])
    assert refused.value.status == 403
    assert "SPDY/3.1+v9.portforward.k8s.io" in refused.value.body and TUNNEL in refused.value.body
    # The tunnel is port-forward's: exec refuses it.
    with pytest.raises(UpgradeRefused) as refused:
        await WebSocketTunnel.connect(exec_url(server, ["true"]), [TUNNEL])
    assert refused.value.status == 403


async def test_a_text_message_breaks_the_tunnel(server):
    url = server.url("portforward", {"pod_id": "p1"})
    tunnel = await WebSocketTunnel.connect(url, [TUNNEL])
    try:
        tunnel.write_text("not SPDY")
        assert await asyncio.wait_for(tunnel.read(), 10) == b""
        assert tunnel.protocol.close_rcvd is not None and tunnel.protocol.close_rcvd.code == 1003
    finally:
        await tunnel.close()


async def test_closing_the_tunnel_ends_the_forwarded_connections(server):
    ended = asyncio.Event()
    accepted = asyncio.Event()

    async def handle(reader, writer):
        accepted.set()
        while await reader.read(65536):
            pass
        ended.set()
        writer.close()

    pod_side = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        port = pod_side.sockets[0].getsockname()[1]
        tunnel = await WebSocketTunnel.connect(server.url("portforward", {"pod_id": "p1"}), [TUNNEL])
        client = SpdyClient(tunnel, "portforward.k8s.io")
        headers = {"port": str(port), "requestID": "1"}
        await client.open_stream({"streamType": "error", **headers})
        data = await client.open_stream({"streamType": "data", **headers})
        await data.write(b"still open")
        await asyncio.wait_for(accepted.wait(), 10)
        await client.close()  # the WebSocket closes; the data stream never saw a FIN
        await asyncio.wait_for(ended.wait(), 10)
    finally:
        pod_side.close()
        await pod_side.wait_closed()


# -- TLS ------------------------------------------------------------------------


async def test_tls_streaming_server(tmp_path):
    import ssl
    import subprocess

    from shared.config import Config

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    config = Config()
    config.crio.api.stream_enable_tls = True
    config.crio.api.stream_tls_cert = str(cert)
    config.crio.api.stream_tls_key = str(key)
    srv = StreamingServer.from_config(config, FakeBackend())
    await srv.start()
    try:
        assert srv.base_url.startswith("https://127.0.0.1:")
        url = exec_url(srv, ["echo", "secret"], stderr=False)
        tls = ssl.create_default_context(cafile=str(cert))
        client = await SpdyClient.connect(url, ["v4.channel.k8s.io"], tls=tls)
        try:
            error = await client.open_stream({"streamType": "error"})
            stdout = await client.open_stream({"streamType": "stdout"})
            assert await stdout.read_all() == b"secret\n"
            assert json.loads(await error.read_all())["status"] == "Success"
        finally:
            await client.close()
    finally:
        await srv.stop()


# -- idle connections -------------------------------------------------------------


def test_idle_timeout_durations():
    from services.frontend.streaming.idle import parse_duration

    assert parse_duration("4h") == 14400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("250ms") == 0.25
    assert parse_duration("0") == 0
    with pytest.raises(ValueError):
        parse_duration("4 hours")


async def test_idle_connection_is_closed_and_its_session_ended():
    backend = FakeBackend()
    srv = StreamingServer(backend, idle_timeout=0.5)
    await srv.start()
    try:
        url = exec_url(srv, ["sleep", "300"], stderr=False)
        client, s = await spdy_exec(url, stderr=False)
        await asyncio.wait_for(client.closed.wait(), 20)  # the server hung up on the silent client
        for _ in range(400):
            if backend.sessions and backend.sessions[0].closed:
                break
            await asyncio.sleep(0.05)
        assert backend.sessions[0].closed
        assert backend.sessions[0].proc.returncode is not None
        await client.close()
    finally:
        await srv.stop()


async def test_spdy_port_forward_without_request_ids(server, echo_server):
    url = server.url("portforward", {"pod_id": "p1"})
    client = await SpdyClient.connect(url, ["portforward.k8s.io"])
    try:
        error = await client.open_stream({"streamType": "error", "port": str(echo_server)})
        await error.close()
        data = await client.open_stream({"streamType": "data", "port": str(echo_server)})
        await data.write(b"old client")
        await data.close()
        assert await data.read_all() == b"OLD CLIENT"
        assert await error.read_all() == b""
    finally:
        await client.close()
