"""Who the five processes of `criopy run` are: users, groups, sockets, and one instance of each."""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
import sys
import time

import pytest
from cri_api.v1 import api_pb2

from shared import identities
from shared.config import Config
from shared.services import START_ORDER, service_class
from tests.e2e.test_privilege_drill import stack_config
from tests.support.stack import REPO, Dirs, Stack, criopy, start_stack

pytestmark = pytest.mark.root


def task_status(pid: int) -> list[dict[str, str]]:
    """/proc/PID/task/*/status of every thread, as key: value."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            found.append({k: v.strip() for k, _, v in (line.partition(":") for line in f)})
    return found


def test_each_service_runs_with_its_identity(stack: Stack) -> None:
    status = stack.status()
    config = Config()
    for name in START_ORDER:
        expected = identities.resolve(identities.identity(name, config))
        creds = identities.process_credentials(status[name]["pid"])
        assert creds == expected, (name, creds, expected)
        assert (status[name]["uid"], status[name]["gid"], set(status[name]["groups"])) == \
            (expected.uid, expected.gid, set(expected.groups)), name
    assert status["frontend"]["user"] == "criopy-frontend" and status["imaged"]["user"] == "criopy-imaged"
    assert status["frontend"]["uid"] != 0 and status["imaged"]["uid"] != 0
    assert status["runtimed"]["uid"] == 0 and status["runtimed"]["group_names"] == ["criopy-runtimed"]


def test_the_frontend_left_root_in_every_thread_with_no_capability(stack: Stack) -> None:
    frontend = stack.status()["frontend"]
    user = pwd.getpwnam("criopy-frontend")
    threads = task_status(frontend["pid"])
    assert len(threads) > 1  # gRPC's threads were there before it left root
    for thread in threads:
        assert thread["Uid"].split() == [str(user.pw_uid)] * 4, thread["Name"]
        assert thread["Gid"].split() == [str(user.pw_gid)] * 4, thread["Name"]
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(thread[key], 16) == 0, (thread["Name"], key)
        assert thread["NoNewPrivs"] == "1", thread["Name"]
    assert all(v == [] for v in frontend["capability_sets"].values()), frontend["capability_sets"]


def test_criopy_status_shows_uid_gid_and_capabilities(stack: Stack) -> None:
    result = criopy(stack.dirs, "status")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    assert set(lines) == set(START_ORDER)
    assert "UID" in result.stdout.splitlines()[0] and "GID" in result.stdout.splitlines()[0]
    frontend = pwd.getpwnam("criopy-frontend")
    assert f"{frontend.pw_uid}(criopy-frontend)" in lines["frontend"]
    assert f"{frontend.pw_gid}(criopy-frontend)" in lines["frontend"]
    assert lines["frontend"].rstrip().endswith("none")
    assert "0(root)" in lines["netd"] and "criopy-netd" in lines["netd"]
    assert lines["netd"].rstrip().endswith(",".join(
        sorted(c.removeprefix("CAP_") for c in service_class("netd").declared_capabilities())))


def test_the_sockets_have_their_owners_and_modes(stack: Stack) -> None:
    info = os.stat(stack.dirs.socket)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    assert (info.st_uid, info.st_gid) == (0, 0)
    config = stack_config(stack.dirs)
    supervisor = config.service_bus_dir("supervisor")
    assert stat.S_IMODE(supervisor.stat().st_mode) == 0o700 and supervisor.stat().st_uid == 0
    for name in ("storaged", "imaged", "netd", "runtimed"):
        directory = config.service_bus_dir(name).stat()
        assert stat.S_IMODE(directory.st_mode) == 0o2750, name
        assert directory.st_gid == grp.getgrnam(f"criopy-{name}").gr_gid, name
        socket = os.stat(config.bus_endpoint(name).removeprefix("ipc://"))
        assert stat.S_IMODE(socket.st_mode) == 0o660 and socket.st_gid == directory.st_gid, name
    imaged_state = (stack.dirs.root / "imaged").stat()
    assert imaged_state.st_uid == pwd.getpwnam("criopy-imaged").pw_uid and stat.S_IMODE(imaged_state.st_mode) == 0o700


def test_the_cri_socket_takes_the_configured_group(dirs: Dirs) -> None:
    (dirs.cni / "10-test.conflist").write_text('{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"loopback"}]}')
    s = start_stack(dirs, "--set", 'crio.api.listen_group="nogroup"', "--set", 'crio.api.listen_mode="0600"')
    try:
        info = os.stat(dirs.socket)
        assert (info.st_uid, info.st_gid) == (0, grp.getgrnam("nogroup").gr_gid)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert s.runtime.Version(api_pb2.VersionRequest(), timeout=5).runtime_name == "crio-py"
    finally:
        s.stop()


def test_a_second_instance_refuses_to_start_and_the_first_keeps_working(stack: Stack) -> None:
    config = stack_config(stack.dirs)
    sockets = [stack.dirs.socket, *(config.bus_endpoint(n).removeprefix("ipc://") for n in
                                    ("storaged", "imaged", "netd", "runtimed", "supervisor"))]
    inodes = [os.stat(p).st_ino for p in sockets]
    status = stack.status()

    second = criopy(stack.dirs, "run", timeout=60)
    assert second.returncode != 0
    assert f"criopy run is already running (pid {stack.process.pid}" in second.stderr, second.stderr
    for name in ("runtimed", "imaged", "frontend"):
        again = criopy(stack.dirs, "service", name, timeout=60)
        assert again.returncode != 0, name
        assert f"criopy service {name} is already running (pid {status[name]['pid']}" in again.stderr, again.stderr

    assert [os.stat(p).st_ino for p in sockets] == inodes
    assert {n: s["pid"] for n, s in stack.status().items()} == {n: s["pid"] for n, s in status.items()}
    assert stack.runtime.Version(api_pb2.VersionRequest(), timeout=5).runtime_name == "crio-py"
    assert stack.runtime.Status(api_pb2.StatusRequest(), timeout=5).status.conditions


def test_criopy_run_refuses_while_a_service_runs_alone(dirs: Dirs) -> None:
    alone = subprocess.Popen([sys.executable, "-m", "shared.cli", *dirs.flags(), "service", "storaged"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        socket = stack_config(dirs).bus_endpoint("storaged").removeprefix("ipc://")
        started = time.monotonic()
        while not os.path.exists(socket):
            assert alone.poll() is None and time.monotonic() - started < 30
            time.sleep(0.1)
        result = criopy(dirs, "run", timeout=60)
        assert result.returncode != 0
        assert f"criopy service storaged is already running (pid {alone.pid})" in result.stderr, result.stderr
        assert alone.poll() is None
    finally:
        alone.terminate()
        alone.wait(30)


def test_status_without_a_supervisor_reads_the_services_locks(dirs: Dirs) -> None:
    alone = subprocess.Popen([sys.executable, "-m", "shared.cli", *dirs.flags(), "service", "storaged"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        while True:
            report = json.loads(criopy(dirs, "status", "--json").stdout)
            if report["storaged"]["state"] == "up" or time.monotonic() - started > 30:
                break
            time.sleep(0.2)
        assert report["storaged"]["pid"] == alone.pid and report["storaged"]["group_names"] == ["criopy-storaged"]
        assert set(report["storaged"]["capabilities"]) == set(service_class("storaged").declared_capabilities())
        assert report["netd"]["state"] == "down"
    finally:
        alone.terminate()
        alone.wait(30)
