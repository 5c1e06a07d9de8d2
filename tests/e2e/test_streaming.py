"""Exec, Attach and PortForward through the real CRI socket and the real streaming server.

The clients are the tests' own: a SPDY/3.1 client written from the draft and
the kubelet's protocol docs (tests/frontend/streaming/spdy_client.py), run
over the upgraded connection or tunnelled in a WebSocket (tunnel.py), and the
`websockets` client library for the channel protocols.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2
from websockets.asyncio.client import connect as ws_connect

from tests.frontend.streaming.spdy_client import SpdyClient, UpgradeRefused
from tests.frontend.streaming.tunnel import WebSocketTunnel
from tests.support.pods import bridge_stack, busybox_registry
from tests.support.stack import Stack, criopy

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

CGROUP_PARENT = f"/criopy-stream-{secrets.token_hex(3)}"
HTTP_PORT = 8080
ECHO_PORT = 9090


@dataclass
class World:
    stack: Stack
    pod: str
    worker: str  # sleeps; exec target
    echoer: str  # reads stdin, echoes; attach target
    web: str  # busybox httpd on 127.0.0.1:8080
    echo: str  # busybox nc echoing every connection on port 9090


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with busybox_registry(tmp_path_factory.mktemp("stream-registry"), "stream/busybox",
                          cmd=["sh"], env=["PATH=/bin"]) as (registry, image), \
            bridge_stack("cps-", CGROUP_PARENT, registry=registry) as stack:
        stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
        pod_cfg = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="streams", namespace="e2e", uid=secrets.token_hex(8)),
            hostname="streams", linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=f"{CGROUP_PARENT}/streams"))
        pod = stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_cfg), timeout=60).pod_sandbox_id

        def container(name: str, command: list[str], **extra) -> str:
            cfg = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=name),
                                          image=api_pb2.ImageSpec(image=image), command=command,
                                          log_path=f"{name}.log", **extra)
            cid = stack.runtime.CreateContainer(api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod, config=cfg, sandbox_config=pod_cfg), timeout=60).container_id
            stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=60)
            return cid

        worker = container("worker", ["sleep", "100000"])
        echoer = container("echoer", ["sh", "-c", "while read line; do echo echo:$line; done"], stdin=True)
        web = container("web", ["sh", "-c", "mkdir -p /www && echo hello over port-forward > /www/index.html && "
                                            f"exec busybox httpd -f -p 127.0.0.1:{HTTP_PORT} -h /www"])
        echo = container("echo", ["busybox", "nc", "-ll", "-p", str(ECHO_PORT), "-e", "cat"])
        yield World(stack, pod, worker, echoer, web, echo)


def exec_url(world: World, cmd: list[str], *, container: str | None = None, stdin=False, stdout=True,
             stderr=True, tty=False) -> str:
    return world.stack.runtime.Exec(api_pb2.ExecRequest(
        container_id=container or world.worker, cmd=cmd, stdin=stdin, stdout=stdout, stderr=stderr, tty=tty),
        timeout=30).url


async def spdy_open(url: str, *, stdin=False, stdout=True, stderr=True, tty=False):
    client = await SpdyClient.connect(url, ["v4.channel.k8s.io", "v3.channel.k8s.io"])
    s = {"error": await client.open_stream({"streamType": "error"})}
    await s["error"].close()
    if stdin:
        s["stdin"] = await client.open_stream({"streamType": "stdin"})
    if stdout:
        s["stdout"] = await client.open_stream({"streamType": "stdout"})
    if stderr:
        s["stderr"] = await client.open_stream({"streamType": "stderr"})
    if tty:
        s["resize"] = await client.open_stream({"streamType": "resize"})
    return client, s


async def ws_messages(ws) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    async for message in ws:
        out[message[0]] = out.get(message[0], b"") + message[1:]
    return out


def ws(url: str) -> str:
    return url.replace("http://", "ws://", 1)


def _sleepers(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", marker.encode()]:
                    found.append(int(entry))
            except OSError:
                pass
    return found


# -- validation ----------------------------------------------------------------


def test_requests_are_validated(world: World) -> None:
    rt = world.stack.runtime
    for bad in (api_pb2.ExecRequest(container_id=world.worker, cmd=["true"]),  # no stream at all
                api_pb2.ExecRequest(container_id=world.worker, cmd=["true"], tty=True, stdout=True, stderr=True),
                api_pb2.ExecRequest(container_id=world.worker, stdout=True)):  # no command
        with pytest.raises(grpc.RpcError) as e:
            rt.Exec(bad, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        rt.Exec(api_pb2.ExecRequest(container_id="0" * 64, cmd=["true"], stdout=True), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        rt.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id="f" * 64), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# -- exec --------------------------------------------------------------------------


async def test_spdy_exec_output_and_exit_code(world: World) -> None:
    client, s = await spdy_open(exec_url(world, ["sh", "-c", "echo out; echo err >&2; exit 3"]))
    try:
        out, err, status = await asyncio.gather(s["stdout"].read_all(), s["stderr"].read_all(),
                                                s["error"].read_all())
    finally:
        await client.close()
    assert (out, err) == (b"out\n", b"err\n")
    st = json.loads(status)
    assert st["status"] == "Failure" and st["reason"] == "NonZeroExitCode"
    assert st["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]


async def test_spdy_exec_stdin_success(world: World) -> None:
    client, s = await spdy_open(exec_url(world, ["sh", "-c", "cat; echo done"], stdin=True, stderr=False),
                                stdin=True, stderr=False)
    try:
        await s["stdin"].write(b"line one\n" * 10000)
        await s["stdin"].close()
        out = await s["stdout"].read_all()
        status = json.loads(await s["error"].read_all())
    finally:
        await client.close()
    assert out == b"line one\n" * 10000 + b"done\n"
    assert status == {"metadata": {}, "status": "Success"}


async def test_spdy_exec_tty_with_resize(world: World) -> None:
    script = 'while [ "$(busybox stty size)" != "33 101" ]; do sleep 0.1; done; echo resized; read x; echo got:$x'
    url = exec_url(world, ["sh", "-c", script], stdin=True, tty=True, stderr=False)
    client, s = await spdy_open(url, stdin=True, tty=True, stderr=False)
    try:
        await s["resize"].write(json.dumps({"Width": 101, "Height": 33}).encode())
        out = b""
        while b"resized" not in out:
            chunk = await s["stdout"].read()
            assert chunk, out
            out += chunk
        await s["stdin"].write(b"typed\r")
        out += await s["stdout"].read_all()
        status = json.loads(await s["error"].read_all())
    finally:
        await client.close()
    assert b"got:typed" in out
    assert status["status"] == "Success"


async def test_websocket_v5_exec_with_stdin_close(world: World) -> None:
    url = exec_url(world, ["sh", "-c", "wc -c; exit 4"], stdin=True, stderr=False)
    async with ws_connect(ws(url), subprotocols=["v5.channel.k8s.io", "v4.channel.k8s.io"]) as conn:
        assert conn.subprotocol == "v5.channel.k8s.io"
        await conn.send(b"\x00" + b"z" * 1000)
        await conn.send(bytes([255, 0]))  # v5: stdin is done
        out = await ws_messages(conn)
    assert out[1].strip() == b"1000"
    st = json.loads(out[3])
    assert st["reason"] == "NonZeroExitCode" and st["details"]["causes"][0]["message"] == "4"


async def test_websocket_v4_exec_tty_resize(world: World) -> None:
    script = 'while [ "$(busybox stty size)" != "40 120" ]; do sleep 0.1; done; echo resized'
    url = exec_url(world, ["sh", "-c", script], tty=True, stderr=False)
    async with ws_connect(ws(url), subprotocols=["v4.channel.k8s.io"]) as conn:
        await conn.send(b"\x04" + json.dumps({"Width": 120, "Height": 40}).encode())
        out = await ws_messages(conn)
    assert b"resized" in out[1]
    assert json.loads(out[3])["status"] == "Success"


async def test_exec_of_a_missing_command_is_a_clear_error(world: World) -> None:
    client, s = await spdy_open(exec_url(world, ["no-such-binary"]))
    try:
        await asyncio.gather(s["stdout"].read_all(), s["stderr"].read_all())
        st = json.loads(await s["error"].read_all())
    finally:
        await client.close()
    assert st["status"] == "Failure" and "no-such-binary" in st["message"]


async def test_token_reuse_is_refused(world: World) -> None:
    url = exec_url(world, ["true"], stderr=False)
    client, s = await spdy_open(url, stderr=False)
    await s["error"].read_all()
    await client.close()
    with pytest.raises(UpgradeRefused) as refused:
        await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    assert refused.value.status == 404


async def test_disconnect_mid_stream_leaves_no_process(world: World) -> None:
    marker = str(40000 + secrets.randbelow(20000))
    client, s = await spdy_open(exec_url(world, ["sh", "-c", f"echo started; exec sleep {marker}"], stderr=False),
                                stderr=False)
    assert await s["stdout"].read() == b"started\n"
    for _ in range(100):
        if _sleepers(marker):
            break
        await asyncio.sleep(0.05)
    assert _sleepers(marker)
    await client.close()  # the client goes away without a word
    for _ in range(600):
        if not _sleepers(marker):
            break
        await asyncio.sleep(0.05)
    assert not _sleepers(marker), "\n".join(
        ln for ln in world.stack.logs().splitlines() if "session" in ln or "stream" in ln or "spdy" in ln)[-6000:]


# -- attach ------------------------------------------------------------------


async def test_spdy_attach_echoes_stdin(world: World) -> None:
    url = world.stack.runtime.Attach(api_pb2.AttachRequest(container_id=world.echoer, stdin=True, stdout=True),
                                     timeout=30).url
    client, s = await spdy_open(url, stdin=True, stderr=False)
    try:
        await s["stdin"].write(b"first\nsecond\n")
        out = b""
        while b"echo:second\n" not in out:
            chunk = await s["stdout"].read()
            assert chunk, out
            out += chunk
        await s["stdin"].close()
        status = json.loads(await s["error"].read_all())
    finally:
        await client.close()
    assert out == b"echo:first\necho:second\n"
    assert status["status"] == "Success"


# -- port forward ------------------------------------------------------------


def pf_url(world: World, ports: list[int] | None = None) -> str:
    return world.stack.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=world.pod, port=ports or []),
                                           timeout=30).url


async def _spdy_http(client: SpdyClient, request_id: int) -> tuple[bytes, bytes]:
    headers = {"port": str(HTTP_PORT), "requestID": str(request_id)}
    error = await client.open_stream({"streamType": "error", **headers})
    await error.close()
    data = await client.open_stream({"streamType": "data", **headers})
    await data.write(b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n")
    return await data.read_all(), await error.read_all()


async def test_spdy_port_forward_http(world: World) -> None:
    client = await SpdyClient.connect(pf_url(world), ["portforward.k8s.io"])
    try:
        for _ in range(100):  # httpd may still be starting
            reply, error = await _spdy_http(client, 0)
            if reply:
                break
            await asyncio.sleep(0.1)
        results = await asyncio.gather(*(_spdy_http(client, i) for i in range(1, 7)))
    finally:
        await client.close()
    for reply, error in [(reply, error), *results]:
        assert error == b""
        assert b" 200 " in reply.split(b"\r\n")[0]
        assert reply.endswith(b"hello over port-forward\n")


async def test_spdy_port_forward_closed_port_reports_error(world: World) -> None:
    client = await SpdyClient.connect(pf_url(world), ["portforward.k8s.io"])
    try:
        headers = {"port": "9", "requestID": "0"}
        error = await client.open_stream({"streamType": "error", **headers})
        await error.close()
        data = await client.open_stream({"streamType": "data", **headers})
        message = await error.read_all()
        await data.read_all()
    finally:
        await client.close()
    assert b"error forwarding port 9" in message


async def test_websocket_port_forward_http(world: World) -> None:
    async def once() -> bytes:
        url = pf_url(world, [HTTP_PORT]) + f"?port={HTTP_PORT}"
        async with ws_connect(ws(url), subprotocols=["v4.channel.k8s.io"]) as conn:
            prefix = struct.pack("<H", HTTP_PORT)
            assert {await conn.recv(), await conn.recv()} == {b"\x00" + prefix, b"\x01" + prefix}
            await conn.send(b"\x00GET / HTTP/1.0\r\n\r\n")
            reply = b""
            async for message in conn:
                if message[0] == 0:
                    reply += message[1:]
            return reply

    reply = b""
    for _ in range(100):
        reply = await once()
        if reply:
            break
        await asyncio.sleep(0.1)
    assert b" 200 " in reply.split(b"\r\n")[0] and reply.endswith(b"hello over port-forward\n")


def _dd_written(marker: str) -> tuple[int | None, int]:
    """(pid, bytes written) of the dd whose count is `marker`."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                # busybox dd cuts its own "key=value" arguments in two
                if b"dd" in args[:2] and (b"\0count\0" + marker.encode() + b"\0" in b"\0".join(args)
                                         or f"count={marker}".encode() in args):
                    io = Path(f"/proc/{entry}/io").read_text()
                    return int(entry), int(io.split("wchar:")[1].split()[0])
            except (OSError, IndexError, ValueError):
                pass
    return None, 0


async def test_a_client_that_stops_reading_stops_the_command(world: World) -> None:
    blocks = 4000 + secrets.randbelow(1000)  # ~256 MiB, and a marker to find the process by
    url = exec_url(world, ["busybox", "dd", "if=/dev/zero", "bs=65536", f"count={blocks}"], stderr=False)
    client, s = await spdy_open(url, stderr=False)
    try:
        assert await s["stdout"].read()  # output flows...
        client._task.cancel()  # ...then the client stops reading its socket
        last, same = -1, 0
        for _ in range(240):  # until the whole pipeline is full and dd is blocked
            await asyncio.sleep(0.25)
            pid, written = _dd_written(str(blocks))
            assert pid is not None, "dd finished: nothing held it back"
            same = same + 1 if written == last else 0
            last = written
            if same >= 8:
                break
        assert same >= 8
        # Kernel socket buffers, the pipe, and crio-py's bounded buffers: far less than the 256 MiB.
        assert last < 48 * 1024 * 1024, last
    finally:
        await client.close()
    for _ in range(600):
        if _dd_written(str(blocks))[0] is None:
            break
        await asyncio.sleep(0.05)
    assert _dd_written(str(blocks))[0] is None


async def test_websocket_attach_echoes_stdin(world: World) -> None:
    url = world.stack.runtime.Attach(api_pb2.AttachRequest(container_id=world.echoer, stdin=True, stdout=True),
                                     timeout=30).url
    async with ws_connect(ws(url), subprotocols=["v5.channel.k8s.io"]) as conn:
        assert await conn.recv() == b"\x01"
        await conn.send(b"\x00over websocket\n")
        out = b""
        while b"echo:over websocket\n" not in out:
            message = await conn.recv()
            if message[0] == 1:
                out += message[1:]
        await conn.send(bytes([255, 0]))
        rest = await ws_messages(conn)
    assert json.loads(rest[3])["status"] == "Success"


@pytest.mark.parametrize("subprotocol", ["SPDY/3.1+portforward.k8s.io", "v2.portforward.k8s.io"])
async def test_spdy_tunnelled_in_a_websocket_forwards_to_the_pod(world: World, subprotocol: str) -> None:
    # split: SPDY frames cut across WebSocket messages, as client-go's tunnel writes them
    tunnel = await WebSocketTunnel.connect(pf_url(world), [subprotocol], split=1000)
    assert tunnel.subprotocol == subprotocol
    client = SpdyClient(tunnel, "portforward.k8s.io")
    try:
        reply, error = b"", b""
        for attempt in range(100):  # httpd may still be starting
            reply, error = await _spdy_http(client, attempt)
            if reply:
                break
            await asyncio.sleep(0.1)
        assert error == b"" and reply.endswith(b"hello over port-forward\n")

        async def echo(request_id: int, payload: bytes) -> tuple[bytes, bytes]:
            headers = {"port": str(ECHO_PORT), "requestID": str(request_id)}
            error = await client.open_stream({"streamType": "error", **headers})
            await error.close()
            data = await client.open_stream({"streamType": "data", **headers})
            await data.write(payload)
            await data.close()
            return await data.read_all(), await error.read_all()

        payloads = [secrets.token_bytes(300_000) for _ in range(3)]
        for _ in range(100):  # nc may still be starting
            if (await echo(1000, b"ping"))[0] == b"ping":
                break
            await asyncio.sleep(0.1)
        results = await asyncio.gather(*(echo(1001 + i, p) for i, p in enumerate(payloads)))
    finally:
        await client.close()
    assert results == [(p, b"") for p in payloads]


# -- many sessions, and a daemon restarting under one ----------------------------


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                pass
    return found


async def _read_until(stream, marker: bytes) -> bytes:
    out = b""
    while marker not in out:
        chunk = await stream.read()
        assert chunk, out
        out += chunk
    return out


async def test_a_hundred_open_sessions_leave_runtimed_answering(world: World) -> None:
    marker = f"echoer-{secrets.token_hex(4)}"
    script = "echo ready; while read line; do echo got:$line; done"

    async def open_session():
        client, s = await spdy_open(exec_url(world, ["sh", "-c", script, marker], stdin=True, stderr=False),
                                    stdin=True, stderr=False)
        await _read_until(s["stdout"], b"ready\n")
        return client, s

    sessions = []
    try:
        for _ in range(10):
            sessions += await asyncio.gather(*(open_session() for _ in range(10)))
        assert len(_processes_with(marker)) == 100
        # Every session is open, each with its process and its stdin: runtimed still answers calls.
        status = await asyncio.to_thread(world.stack.status)
        assert status["runtimed"]["state"] == "up" and status["runtimed"]["ready"], status
        reply = await asyncio.to_thread(world.stack.runtime.ExecSync, api_pb2.ExecSyncRequest(
            container_id=world.worker, cmd=["echo", "answered"], timeout=10), timeout=30)
        assert reply.stdout == b"answered\n" and reply.exit_code == 0
        listed = await asyncio.to_thread(world.stack.runtime.ListContainers, api_pb2.ListContainersRequest(),
                                         timeout=30)
        assert world.worker in {c.id for c in listed.containers}
        # The cap on sessions holds: one more is refused, with a reason.
        client, s = await spdy_open(exec_url(world, ["true"], stderr=False), stderr=False)
        try:
            refused = json.loads(await s["error"].read_all())
        finally:
            await client.close()
        assert refused["status"] == "Failure" and "too many streaming sessions" in refused["message"]
        # And every session still carries bytes both ways.
        for i, (_client, s) in enumerate(sessions):
            await s["stdin"].write(f"ping-{i}\n".encode())
        for i, (_client, s) in enumerate(sessions):
            assert f"got:ping-{i}\n".encode() in await _read_until(s["stdout"], f"ping-{i}\n".encode())
    finally:
        await asyncio.gather(*(client.close() for client, _s in sessions))
    for _ in range(600):
        if not _processes_with(marker):
            break
        await asyncio.sleep(0.05)
    assert not _processes_with(marker)


def _restart(stack: Stack, service: str, *, crash: bool = False) -> None:
    """Restart `service` as an operator would, or by killing it (the supervisor starts it again)."""
    before = stack.pid(service)
    if crash:
        os.kill(before, signal.SIGKILL)
    else:
        result = criopy(stack.dirs, "restart", service)
        assert result.returncode == 0, result.stderr
    for _ in range(150):
        status = stack.status().get(service, {})
        if status.get("state") == "up" and status.get("ready") and status.get("pid") not in (None, before):
            return
        time.sleep(0.2)
    raise AssertionError(f"{service} did not come back: {stack.status()}")


@pytest.mark.parametrize("crash", [False, True], ids=["restart", "crash"])
async def test_restarting_runtimed_ends_its_sessions(world: World, crash: bool) -> None:
    marker = str(40000 + secrets.randbelow(20000))
    client, s = await spdy_open(exec_url(world, ["sh", "-c", f"echo started; exec sleep {marker}"], stdin=True,
                                         stderr=False), stdin=True, stderr=False)
    try:
        await _read_until(s["stdout"], b"started\n")
        for _ in range(100):
            if _sleepers(marker):
                break
            await asyncio.sleep(0.05)
        assert _sleepers(marker)
        await asyncio.to_thread(_restart, world.stack, "runtimed", crash=crash)
        # The client is told, rather than left waiting on a session nobody serves any more.
        status = json.loads(await asyncio.wait_for(s["error"].read_all(), 30))
        assert await s["stdout"].read_all() == b""
    finally:
        await client.close()
    reason = "runtimed went away" if crash else "runtimed stopped"
    assert status["status"] == "Failure" and reason in status["message"], status
    # Stopping runtimed ends its sessions; a runtimed that dies leaves runc a hangup to pass on.
    for _ in range(100):
        if not _sleepers(marker):
            break
        await asyncio.sleep(0.05)
    assert not _sleepers(marker)
    # The restarted runtimed serves new sessions.
    client, s = await spdy_open(exec_url(world, ["echo", "again"], stderr=False), stderr=False)
    try:
        assert await s["stdout"].read_all() == b"again\n"
        assert json.loads(await s["error"].read_all())["status"] == "Success"
    finally:
        await client.close()


async def test_execs_that_outlive_a_killed_runtimed_are_ended(world: World) -> None:
    sync_marker, stream_marker = (str(60000 + secrets.randbelow(20000) + i) for i in (0, 20000))

    def exec_sync() -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as failed:
            world.stack.runtime.ExecSync(api_pb2.ExecSyncRequest(
                container_id=world.worker, cmd=["sleep", sync_marker]), timeout=60)
        return failed.value.code()

    syncing = asyncio.ensure_future(asyncio.to_thread(exec_sync))
    # A command that ignores the hangup runc passes on when runtimed dies.
    client, s = await spdy_open(exec_url(world, ["sh", "-c", f"trap '' HUP; echo started; sleep {stream_marker}"],
                                         stdin=True, stderr=False), stdin=True, stderr=False)
    try:
        await _read_until(s["stdout"], b"started\n")
        for _ in range(100):
            if _sleepers(sync_marker) and _sleepers(stream_marker):
                break
            await asyncio.sleep(0.05)
        assert _sleepers(sync_marker) and _sleepers(stream_marker)
        await asyncio.to_thread(_restart, world.stack, "runtimed", crash=True)
        assert await syncing == grpc.StatusCode.UNAVAILABLE
    finally:
        await client.close()
    # The restarted runtimed found both and ended them, and left none of their files.
    for _ in range(100):
        if not _sleepers(sync_marker) and not _sleepers(stream_marker):
            break
        await asyncio.sleep(0.05)
    assert _sleepers(sync_marker) == [] and _sleepers(stream_marker) == []
    bundle = world.stack.dirs.root / "runtimed" / "containers" / world.worker
    assert sorted(p.name for p in bundle.glob("exec-*")) == []
    reply = await asyncio.to_thread(world.stack.runtime.ExecSync, api_pb2.ExecSyncRequest(
        container_id=world.worker, cmd=["echo", "still serving"], timeout=10), timeout=30)
    assert reply.stdout == b"still serving\n"


def test_an_exec_sync_whose_caller_gave_up_is_ended(world: World) -> None:
    marker = str(80000 + secrets.randbelow(10000))
    # No timeout of its own: the command runs until the caller's deadline, then goes.
    with pytest.raises(grpc.RpcError) as failed:
        world.stack.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=world.worker, cmd=["sleep", marker]),
                                     timeout=2)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if not _sleepers(marker):
            break
        time.sleep(0.05)
    assert _sleepers(marker) == []
