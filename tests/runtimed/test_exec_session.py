"""Streaming exec and attach sessions in real containers (runc exec, conmon's attach socket)."""

from __future__ import annotations

import asyncio
import os

import pytest

from services.runtimed import exec_session
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.runtimed.conftest import container_config, new_container, new_pod

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


async def drain(rt, session, *, limit=1 << 20):
    """Everything the session prints, and its final status."""
    out, err = b"", b""
    while True:
        r = await rt.session_read(session=session, max_bytes=65536, wait_seconds=5)
        out += r["stdout"]
        err += r["stderr"]
        assert len(out) + len(err) <= limit
        if r["done"]:
            return out, err, r


@pytest.fixture
async def running(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    cid = await new_container(runtimed, pod, rootfs, container_config(command=["sleep", "600"]))
    return cid


async def test_exec_pipes_output_and_exit_code(runtimed, running):
    s = (await runtimed.exec_start(container_id=running, cmd=["sh", "-c", "echo out; echo err >&2; exit 3"]))["session"]
    out, err, r = await drain(runtimed, s)
    assert (out, err, r["exit_code"], r["error"]) == (b"out\n", b"err\n", 3, None)
    await runtimed.session_close(session=s)
    with pytest.raises(NotFound):
        await runtimed.session_read(session=s)


async def test_exec_stdin_and_close(runtimed, running):
    s = (await runtimed.exec_start(container_id=running, cmd=["cat"], stdin=True, stderr=False))["session"]
    payload = b"x" * 200_000
    for at in range(0, len(payload), 65536):
        chunk = payload[at:at + 65536]
        while chunk:
            w = await runtimed.session_write(session=s, data=chunk, wait_seconds=1)
            chunk = chunk[w["written"]:]
            if chunk:  # cat's output is full: read some to let it go on
                await runtimed.session_read(session=s, max_bytes=0, wait_seconds=0)
    reader = asyncio.create_task(drain(runtimed, s))
    await runtimed.session_close_stdin(session=s)
    out, _err, r = await reader
    assert out == payload and r["exit_code"] == 0
    await runtimed.session_close(session=s)


async def test_exec_tty_resize(runtimed, running):
    script = 'while [ "$(busybox stty size)" != "33 101" ]; do sleep 0.05; done; echo resized; exit 7'
    s = (await runtimed.exec_start(container_id=running, cmd=["sh", "-c", script], tty=True, stderr=False))["session"]
    await runtimed.session_resize(session=s, width=101, height=33)
    out, _err, r = await drain(runtimed, s)
    assert b"resized" in out and r["exit_code"] == 7
    await runtimed.session_close(session=s)


async def test_exec_tty_stdin_echo(runtimed, running):
    s = (await runtimed.exec_start(container_id=running, cmd=["sh", "-c", "read line; echo got:$line"], tty=True,
                                   stdin=True, stderr=False))["session"]
    await runtimed.session_write(session=s, data=b"hello\r", wait_seconds=5)
    out, _err, r = await drain(runtimed, s)
    assert b"got:hello" in out and r["exit_code"] == 0
    await runtimed.session_close(session=s)


async def test_exec_of_missing_command_is_a_clear_error(runtimed, running):
    s = (await runtimed.exec_start(container_id=running, cmd=["no-such-command"], stderr=True))["session"]
    _out, _err, r = await drain(runtimed, s)
    assert r["exit_code"] is None
    assert "no-such-command" in r["error"]
    await runtimed.session_close(session=s)


async def test_exec_validation(runtimed, running, cgroup_parent, rootfs):
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


async def test_output_is_bounded_when_nobody_reads(runtimed, running):
    s = (await runtimed.exec_start(container_id=running, cmd=["yes"], stderr=False))["session"]
    session = exec_session.sessions_of(runtimed).get(s)
    for _ in range(400):
        if session._size >= exec_session.OUTPUT_LIMIT - exec_session.READ_SIZE:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert exec_session.OUTPUT_LIMIT - exec_session.READ_SIZE <= session._size
    assert session._size < exec_session.OUTPUT_LIMIT + exec_session.READ_SIZE
    r = await runtimed.session_read(session=s, max_bytes=1000, wait_seconds=0)
    assert r["stdout"] == b"y\n" * 500 and not r["done"]
    pid = int(open(session.pid_file).read())
    await runtimed.session_close(session=s)
    assert not _alive(pid)


async def test_abandoned_session_is_ended(runtimed, running):
    runtimed._streaming_sessions = exec_session.Sessions(idle_timeout=1.0)
    s = (await runtimed.exec_start(container_id=running, cmd=["sleep", "600"], stderr=False))["session"]
    session = exec_session.sessions_of(runtimed).get(s)
    for _ in range(100):
        if os.path.exists(session.pid_file):
            break
        await asyncio.sleep(0.05)
    pid = int(open(session.pid_file).read())
    for _ in range(200):
        if s not in runtimed._streaming_sessions.sessions:
            break
        await asyncio.sleep(0.05)
    assert s not in runtimed._streaming_sessions.sessions
    assert not _alive(pid)
    assert not os.path.exists(session.process_file)


async def test_attach_to_a_container_reading_stdin(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    cid = await new_container(runtimed, pod, rootfs, container_config(
        "echoer", command=["sh", "-c", "while read line; do echo echo:$line; echo err:$line >&2; done"],
        stdin=True))
    s = (await runtimed.attach_start(container_id=cid, stdin=True, stdout=True, stderr=True))["session"]
    await runtimed.session_write(session=s, data=b"one\ntwo\n", wait_seconds=5)
    out, err = b"", b""
    while b"echo:two" not in out or b"err:two" not in err:
        r = await runtimed.session_read(session=s, max_bytes=65536, wait_seconds=5)
        out += r["stdout"]
        err += r["stderr"]
        assert not r["done"]
    assert out == b"echo:one\necho:two\n" and err == b"err:one\nerr:two\n"
    # Not stdin_once: closing our stdin ends this attach, the container keeps running.
    await runtimed.session_close_stdin(session=s)
    _o, _e, r = await drain(runtimed, s)
    assert r["done"]
    await runtimed.session_close(session=s)
    status = (await runtimed.container_status(container_id=cid))["status"]
    assert status["state"] == "CONTAINER_RUNNING"
    # A second attach still reaches it.
    s2 = (await runtimed.attach_start(container_id=cid, stdin=True, stdout=True, stderr=False))["session"]
    await runtimed.session_write(session=s2, data=b"three\n", wait_seconds=5)
    out = b""
    while b"echo:three" not in out:
        out += (await runtimed.session_read(session=s2, max_bytes=65536, wait_seconds=5))["stdout"]
    await runtimed.session_close(session=s2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


async def test_attach_to_a_terminal_honours_resize(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    script = 'while [ "$(busybox stty size)" != "33 101" ]; do sleep 0.1; done; echo resized; sleep 600'
    cid = await new_container(runtimed, pod, rootfs, container_config("term", command=["sh", "-c", script],
                                                                      tty=True, stdin=True))
    s = (await runtimed.attach_start(container_id=cid, tty=True, stdin=True, stdout=True, stderr=False))["session"]
    await runtimed.session_resize(session=s, width=101, height=33)
    out = b""
    while b"resized" not in out:
        r = await runtimed.session_read(session=s, max_bytes=65536, wait_seconds=5)
        assert not r["done"], out
        out += r["stdout"]
    await runtimed.session_close(session=s)
