"""Every crictl command a node operator uses, against a running crio-py."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.clients.conftest import CGROUP_PARENT, Crictl, Images
from tests.support.registry import free_port
from tests.support.stack import Stack

pytestmark = pytest.mark.root


def write_json(path: Path, value: dict) -> str:
    path.write_text(json.dumps(value))
    return str(path)


@pytest.fixture(scope="module")
def pod(crictl: Crictl, stack: Stack, test_images: Images) -> Iterator[tuple[str, str]]:
    """A pod and the path of its config; removed through crictl by the tests."""
    crictl.run("pull", test_images.busybox)
    config = write_json(stack.dirs.base / "pod.json", {
        "metadata": {"name": "crictl-pod", "namespace": "clients", "uid": "crictl-pod-uid", "attempt": 0},
        "hostname": "crictl-pod", "log_directory": str(stack.dirs.logs / "crictl-pod"),
        "linux": {"cgroup_parent": f"{CGROUP_PARENT}/crictl-pod"}})
    pod_id = crictl.out("runp", config)
    yield pod_id, config


def create(crictl: Crictl, stack: Stack, pod: tuple[str, str], name: str, image: str, command: list[str],
           **extra: object) -> str:
    config = write_json(stack.dirs.base / f"{name}.json", {
        "metadata": {"name": name}, "image": {"image": image}, "command": command,
        "log_path": f"{name}.log", "linux": {}, **extra})
    container_id = crictl.out("create", pod[0], config, pod[1])
    crictl.run("start", container_id)
    return container_id


def wait_for(predicate, timeout: float = 20, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def run_in_pty(args: list[str], typed: bytes, *, until: bytes | None = None,
               timeout: float = 30) -> tuple[int | None, bytes]:
    """Run `args` on a pseudo-terminal, type `typed`, and collect what it prints until it exits
    (its exit code) or, when `until` is given, until that appears (None: it was ended then)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: crictl on the terminal
        os.execv(args[0], args)
    output = b""
    deadline = time.time() + timeout
    os.write(fd, typed)
    try:
        while time.time() < deadline and not (until and until in output):
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the terminal's other side closed
                    break
                if not chunk:
                    break
                output += chunk
    finally:
        # The terminal closes a moment before the process is gone: give it that moment.
        grace = time.time() + (0 if until else 10)
        while not (ended := os.waitpid(pid, os.WNOHANG))[0] and time.time() < grace:
            time.sleep(0.05)
        if not ended[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    return (os.waitstatus_to_exitcode(ended[1]) if ended[0] else None), output


def test_info_version_and_images(crictl: Crictl, test_images: Images):
    info = crictl.json("info")
    conditions = {c["type"]: c["status"] for c in info["status"]["conditions"]}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}
    assert "crio-py" in crictl.out("version")
    crictl.run("pull", test_images.busybox)
    listed = crictl.json("images")["images"]
    assert any(test_images.busybox in image["repoTags"] for image in listed)
    status = crictl.json("inspecti", test_images.busybox)
    assert status["status"]["repoTags"] == [test_images.busybox]
    assert int(status["status"]["size"]) > 0


def test_container_lifecycle_exec_logs_and_stats(crictl: Crictl, stack: Stack, test_images: Images,
                                                  pod: tuple[str, str]):
    cid = create(crictl, stack, pod, "ticker", test_images.busybox,
                 ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"])
    running = crictl.json("ps", "--id", cid)["containers"]
    assert [c["state"] for c in running] == ["CONTAINER_RUNNING"]
    status = crictl.json("inspect", cid)["status"]
    assert status["state"] == "CONTAINER_RUNNING" and status["logPath"].endswith("ticker.log")
    # exec without a terminal: output, and the command's failure reported.
    assert crictl.out("exec", cid, "echo", "from-exec") == "from-exec"
    failed = crictl.run("exec", cid, "sh", "-c", "exit 3", check=False)
    assert failed.returncode != 0 and "exit code 3" in failed.stdout + failed.stderr
    assert crictl.out("exec", "-s", "--timeout", "10", cid, "cat", "/etc/hostname") == "crictl-pod"
    # exec -it on a real pseudo-terminal.
    code, output = run_in_pty(crictl.args("exec", "-it", cid, "sh"), b"tty; echo $((6*7)); exit\n")
    assert code == 0, output
    assert b"/dev/pts/" in output and b"42" in output
    # logs, logs -f, and logs after the file was rotated and reopened.
    wait_for(lambda: "tick 3" in crictl.out("logs", cid), what="the first log lines")
    follow = subprocess.Popen(crictl.args("logs", "-f", "--tail", "1", cid), stdout=subprocess.PIPE, text=True)
    try:
        lines = [follow.stdout.readline() for _ in range(5)]  # type: ignore[union-attr]
    finally:
        follow.kill()
        follow.wait()
    ticks = [int(line.split()[1]) for line in lines]
    assert ticks == list(range(ticks[0], ticks[0] + 5))
    log_path = Path(status["logPath"])
    os.rename(log_path, log_path.with_suffix(".log.1"))
    crictl.run("logs", "--reopen", cid)
    wait_for(lambda: log_path.exists() and "tick" in log_path.read_text(), what="a reopened log file")
    assert "tick" in crictl.out("logs", "--tail", "2", cid)
    # stats and statsp
    stats = crictl.json("stats", "--id", cid)["stats"]
    assert stats[0]["attributes"]["id"] == cid
    assert int(stats[0]["memory"]["workingSetBytes"]["value"]) > 0
    assert int(stats[0]["cpu"]["usageCoreNanoSeconds"]["value"]) > 0
    pod_stats = crictl.json("statsp", "--id", pod[0])["stats"]
    assert pod_stats[0]["attributes"]["id"] == pod[0]
    assert int(pod_stats[0]["linux"]["memory"]["workingSetBytes"]["value"]) > 0
    # stop and rm
    crictl.run("stop", "--timeout", "1", cid)
    exited = crictl.json("inspect", cid)["status"]
    assert exited["state"] == "CONTAINER_EXITED" and exited["exitCode"] in (128 + 15, 128 + 9)
    crictl.run("rm", cid)
    assert crictl.json("ps", "-a", "--id", cid)["containers"] == []


def test_attach(crictl: Crictl, stack: Stack, test_images: Images, pod: tuple[str, str]):
    cid = create(crictl, stack, pod, "echoer", test_images.busybox,
                 ["sh", "-c", "while read line; do echo got:$line; done"], stdin=True)
    attached = subprocess.Popen(crictl.args("attach", "-i", cid), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        attached.stdin.write("hello\n")  # type: ignore[union-attr]
        attached.stdin.flush()  # type: ignore[union-attr]
        assert attached.stdout.readline().strip() == "got:hello"  # type: ignore[union-attr]
    finally:
        attached.kill()
        attached.wait()
    # A terminal container, attached on a pseudo-terminal.
    tty_cid = create(crictl, stack, pod, "shell", test_images.busybox, ["sh"], stdin=True, tty=True)
    _, output = run_in_pty(crictl.args("attach", "-it", tty_cid), b"echo attached-$((40+2))\n",
                           until=b"attached-42")
    assert b"attached-42" in output
    crictl.run("rm", "-f", cid, tty_cid)


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_port_forward(crictl: Crictl, stack: Stack, test_images: Images, pod: tuple[str, str], transport: str):
    name = f"web-{transport}"
    cid = create(crictl, stack, pod, name, test_images.busybox, ["sh", "-c", "exec httpd -f -p 8080 -h /etc"])
    wait_for(lambda: "8080" in crictl.run("exec", cid, "sh", "-c", "netstat -ltn", check=False).stdout, what="httpd")
    local = free_port()
    forward = subprocess.Popen(crictl.args("port-forward", "--transport", transport, pod[0], f"{local}:8080"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _listening(local), what="crictl to listen")
        for _ in range(3):
            reply = httpx.get(f"http://127.0.0.1:{local}/passwd", timeout=10)
            assert reply.status_code == 200 and reply.text.startswith("root:x:0:0:")
    finally:
        forward.terminate()
        forward.wait()
    crictl.run("rm", "-f", cid)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_pod_stop_remove_and_image_removal(crictl: Crictl, stack: Stack, test_images: Images,
                                           pod: tuple[str, str]):
    cid = create(crictl, stack, pod, "last", test_images.busybox, ["sleep", "600"])
    assert crictl.json("inspectp", pod[0])["status"]["state"] == "SANDBOX_READY"
    crictl.run("stopp", pod[0])
    assert crictl.json("inspectp", pod[0])["status"]["state"] == "SANDBOX_NOTREADY"
    assert crictl.json("inspect", cid)["status"]["state"] == "CONTAINER_EXITED"
    crictl.run("rmp", pod[0])
    assert crictl.json("pods")["items"] == []
    assert crictl.json("ps", "-a")["containers"] == []
    crictl.run("rmi", test_images.busybox)
    assert not any(test_images.busybox in image["repoTags"] for image in crictl.json("images")["images"])
