"""Streaming exec and attach sessions in real containers (runc exec, conmon's attach socket)."""

from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator

import pytest

from shared.bus.streams import STDERR, STDOUT, ClientStream, End, StreamListener
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.runtimed.conftest import container_config, new_container, new_pod
from tests.support.stack import root_as_frontend
from tests.support.streams import read_all

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture
async def streams(runtimed) -> AsyncIterator[StreamListener]:
    """runtimed's stream socket, as the daemon runner gives it."""
    listener = StreamListener("runtimed", runtimed.config.stream_socket("runtimed"),
                              config=root_as_frontend(runtimed.config))
    await listener.start()
    runtimed.streams = listener
    try:
        yield listener
    finally:
        await listener.close()
        runtimed.streams = None


async def connect(streams: StreamListener, started: dict) -> ClientStream:
    return await ClientStream.connect("runtimed", streams.path, started["token"])


async def read_until(client: ClientStream, marker: bytes) -> bytes:
    out = b""
    while marker not in out:
        got = await client.read()
        assert not isinstance(got, End), out
        out += got[1]
    return out


async def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def running(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    cid = await new_container(runtimed, pod, rootfs, container_config(command=["sleep", "600"]))
    return cid


async def test_exec_pipes_output_and_exit_code(runtimed, streams, running):
    client = await connect(streams, await runtimed.exec_start(
        container_id=running, cmd=["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert await read_all(client) == (b"out\n", b"err\n", End(exit_code=3))
    await client.close()
    await wait_for(lambda: not streams.sessions, "the session to be gone")


async def test_exec_stdin_and_close(runtimed, streams, running):
    client = await connect(streams, await runtimed.exec_start(container_id=running, cmd=["cat"], stdin=True,
                                                               stderr=False))
    payload = os.urandom(3_000_000)  # several times the input window and the pipes
    reader = asyncio.create_task(read_all(client, limit=len(payload)))
    await client.write(payload)
    await client.end_input()
    out, _err, end = await reader
    assert out == payload and end == End(exit_code=0)
    await client.close()


async def test_exec_tty_resize(runtimed, streams, running):
    script = 'while [ "$(busybox stty size)" != "33 101" ]; do sleep 0.05; done; echo resized; exit 7'
    client = await connect(streams, await runtimed.exec_start(container_id=running, cmd=["sh", "-c", script],
                                                               tty=True, stderr=False))
    await client.resize(101, 33)
    out, _err, end = await read_all(client)
    assert b"resized" in out and end == End(exit_code=7)
    await client.close()


async def test_exec_tty_stdin_echo(runtimed, streams, running):
    client = await connect(streams, await runtimed.exec_start(
        container_id=running, cmd=["sh", "-c", "read line; echo got:$line"], tty=True, stdin=True, stderr=False))
    await client.write(b"hello\r")
    out, _err, end = await read_all(client)
    assert b"got:hello" in out and end == End(exit_code=0)
    await client.close()


async def test_exec_of_missing_command_is_a_clear_error(runtimed, streams, running):
    client = await connect(streams, await runtimed.exec_start(container_id=running, cmd=["no-such-command"],
                                                               stderr=True))
    _out, _err, end = await read_all(client)
    assert end.exit_code is None
    assert "no-such-command" in end.error
    await client.close()


async def test_exec_validation(runtimed, streams, running, cgroup_parent, rootfs):
    with pytest.raises(InvalidArgument):
        await runtimed.exec_start(container_id=running, cmd=["true"], stdin=False, stdout=False, stderr=False)
    with pytest.raises(InvalidArgument):
        await runtimed.exec_start(container_id=running, cmd=["true"], tty=True, stderr=True)
    with pytest.raises(NotFound):
        await runtimed.exec_start(container_id="nope", cmd=["true"])
    pod = await new_pod(runtimed, cgroup_parent, name="other")
    created = await new_container(runtimed, pod, rootfs, container_config("idle", command=["true"]), start=False)
    with pytest.raises(FailedPrecondition):
        await runtimed.exec_start(container_id=created, cmd=["true"])
    assert not streams.sessions


async def test_output_is_bounded_when_nobody_reads(runtimed, streams, running):
    started = await runtimed.exec_start(container_id=running, cmd=["yes"], stderr=False)
    session = streams.sessions[started["token"]]
    client = await connect(streams, started)
    await wait_for(lambda: os.path.exists(session.pid_file), "the pid file")
    pid = int(open(session.pid_file).read())
    last, same = -1, 0
    for _ in range(300):  # until `yes` is blocked: nothing reads what it writes
        await asyncio.sleep(0.1)
        written = _written(pid)
        same = same + 1 if written == last else 0
        last = written
        if same >= 10:
            break
    assert same >= 10, "yes was never held back"
    # The pipe, one read, the stream's socket buffers and the reader's buffer: far from unbounded.
    assert last < 16 * 1024 * 1024, last
    kind, data = await client.read()
    assert kind == STDOUT and data.startswith(b"y\n" * 500)
    await client.close()
    await wait_for(lambda: not _alive(pid), "the process to be killed")


async def sleeper(runtimed, streams: StreamListener, container_id: str) -> tuple[ClientStream, object, int]:
    """A connected exec session of a long sleep: its client, its session in runtimed, the sleep's pid."""
    started = await runtimed.exec_start(container_id=container_id, cmd=["sh", "-c", "echo ready; exec sleep 600"],
                                        stderr=False)
    session = streams.sessions[started["token"]]
    client = await connect(streams, started)
    assert await read_until(client, b"ready")
    await wait_for(lambda: os.path.exists(session.pid_file), "the pid file")
    return client, session, int(open(session.pid_file).read())


async def test_frontend_going_away_ends_the_session(runtimed, streams, running):
    client, session, pid = await sleeper(runtimed, streams, running)
    await client.close()  # the frontend goes away without a word
    await wait_for(lambda: not _alive(pid), "the process to be killed")
    await wait_for(lambda: not streams.sessions, "the session to be gone")
    assert not os.path.exists(session.process_file)


async def test_stopping_runtimed_ends_the_sessions(runtimed, streams, running):
    client, _session, pid = await sleeper(runtimed, streams, running)
    await streams.close()  # what the daemon runner does when runtimed stops or restarts
    end = await client.read()
    assert isinstance(end, End) and end.exit_code is None and "runtimed stopped" in end.error
    assert not _alive(pid)
    await client.close()


async def test_abandoned_session_is_ended(runtimed, streams, running):
    streams.claim_timeout = 1.0
    started = await runtimed.exec_start(container_id=running, cmd=["sleep", "600"], stderr=False)
    session = streams.sessions[started["token"]]
    await wait_for(lambda: os.path.exists(session.pid_file), "the pid file")
    pid = int(open(session.pid_file).read())
    await wait_for(lambda: started["token"] not in streams.sessions, "the session to be abandoned")
    await wait_for(lambda: not _alive(pid), "the process to be killed")
    assert not os.path.exists(session.process_file)
    # A frontend that comes too late is told so.
    client = await connect(streams, started)
    end = await client.read()
    assert isinstance(end, End) and "not found" in end.error
    await client.close()


async def test_attach_to_a_container_reading_stdin(runtimed, streams, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    cid = await new_container(runtimed, pod, rootfs, container_config(
        "echoer", command=["sh", "-c", "while read line; do echo echo:$line; echo err:$line >&2; done"],
        stdin=True))
    client = await connect(streams, await runtimed.attach_start(container_id=cid, stdin=True, stdout=True,
                                                                 stderr=True))
    await client.write(b"one\ntwo\n")
    out = {STDOUT: b"", STDERR: b""}
    while b"echo:two" not in out[STDOUT] or b"err:two" not in out[STDERR]:
        got = await client.read()
        assert not isinstance(got, End)
        out[got[0]] += got[1]
    assert out == {STDOUT: b"echo:one\necho:two\n", STDERR: b"err:one\nerr:two\n"}
    # Not stdin_once: closing our stdin ends this attach, the container keeps running.
    await client.end_input()
    assert await read_all(client) == (b"", b"", End())
    await client.close()
    status = (await runtimed.container_status(container_id=cid))["status"]
    assert status["state"] == "CONTAINER_RUNNING"
    # A second attach still reaches it.
    client = await connect(streams, await runtimed.attach_start(container_id=cid, stdin=True, stdout=True,
                                                                 stderr=False))
    await client.write(b"three\n")
    assert await read_until(client, b"echo:three")
    await client.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _written(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(f.read().split("wchar:")[1].split()[0])


async def test_attach_to_a_terminal_honours_resize(runtimed, streams, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    script = 'while [ "$(busybox stty size)" != "33 101" ]; do sleep 0.1; done; echo resized; sleep 600'
    cid = await new_container(runtimed, pod, rootfs, container_config("term", command=["sh", "-c", script],
                                                                      tty=True, stdin=True))
    client = await connect(streams, await runtimed.attach_start(container_id=cid, tty=True, stdin=True, stdout=True,
                                                                 stderr=False))
    await client.resize(101, 33)
    assert await read_until(client, b"resized")
    await client.close()
