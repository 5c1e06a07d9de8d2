"""The five services under `criopy run`, seen through the real CRI socket."""

from __future__ import annotations

import json
import os
import signal
import stat
import time

import grpc
import pytest
from cri_api.v1 import api_pb2

from shared import privileges
from shared.services import START_ORDER, service_class
from tests.support.stack import Stack, criopy

pytestmark = pytest.mark.root


def conditions(stack: Stack, timeout: float = 5) -> dict[str, api_pb2.RuntimeCondition]:
    response = stack.runtime.Status(api_pb2.StatusRequest(), timeout=timeout)
    return {c.type: c for c in response.status.conditions}


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value or time.time() > deadline:
            return value
        time.sleep(interval)


def test_version(stack: Stack) -> None:
    v = stack.runtime.Version(api_pb2.VersionRequest(version="v1"), timeout=5)
    assert v.runtime_name == "crio-py"
    assert v.runtime_api_version == "v1"
    assert v.runtime_version


def test_socket_mode(stack: Stack) -> None:
    mode = os.stat(stack.dirs.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_status_ready_and_verbose(stack: Stack) -> None:
    c = conditions(stack)
    assert c["RuntimeReady"].status is True
    assert c["NetworkReady"].status is True
    verbose = stack.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=5)
    services = json.loads(verbose.info["services"])
    assert set(services) == {"imaged", "storaged", "runtimed", "netd"}
    assert all(s["ready"] for s in services.values())


def test_runtime_config_reports_cgroup_driver(stack: Stack) -> None:
    response = stack.runtime.RuntimeConfig(api_pb2.RuntimeConfigRequest(), timeout=5)
    assert response.linux.cgroup_driver == api_pb2.CgroupDriver.CGROUPFS


def test_failed_call_gives_its_code_and_nothing_crashes(stack: Stack) -> None:
    # Every CRI method has a handler now; a daemon's typed error reaches the caller as its gRPC code.
    with pytest.raises(grpc.RpcError) as info:
        stack.runtime.CheckpointContainer(api_pb2.CheckpointContainerRequest(container_id="x", location="/tmp/x.tar"),
                                          timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "x" in info.value.details()
    # ...and nothing crashed.
    assert conditions(stack)["RuntimeReady"].status is True


def test_network_ready_follows_netd(stack: Stack) -> None:
    netd = stack.pid("netd")
    os.kill(netd, signal.SIGSTOP)
    try:
        # Status answers from health probes made beside the calls: a stuck netd shows once its probe times out.
        c = wait_for(lambda: (lambda c: c if not c["NetworkReady"].status else None)(conditions(stack)))
        assert c, "NetworkReady stayed true with netd stopped"
        assert c["NetworkReady"].status is False
        assert c["NetworkReady"].reason == "NetdNotReady"
        assert "netd" in c["NetworkReady"].message
        assert c["RuntimeReady"].status is True
    finally:
        os.kill(netd, signal.SIGCONT)
    assert wait_for(lambda: conditions(stack)["NetworkReady"].status)


def test_network_ready_follows_cni_configuration(stack: Stack) -> None:
    for conf in stack.dirs.cni.iterdir():
        conf.unlink()
    c = wait_for(lambda: (lambda c: c if not c["NetworkReady"].status else None)(conditions(stack)))
    assert c and c["NetworkReady"].reason and str(stack.dirs.cni) in c["NetworkReady"].message


def test_killed_daemon_is_restarted_and_frontend_keeps_serving(stack: Stack) -> None:
    frontend = stack.pid("frontend")
    runtimed = stack.pid("runtimed")
    os.kill(runtimed, signal.SIGKILL)
    # Calls made during the outage answer within their deadline, whatever they say.
    for _ in range(10):
        started = time.monotonic()
        c = conditions(stack, timeout=3)
        assert time.monotonic() - started < 3
        if c["RuntimeReady"].status:
            break
        assert c["RuntimeReady"].reason == "RuntimedNotReady"
    # Status may answer from a probe made just before the kill: the new runtimed is waited for by pid.
    assert wait_for(lambda: conditions(stack)["RuntimeReady"].status
                    and stack.status()["runtimed"].get("pid") not in (None, runtimed))
    status = stack.status()
    assert status["runtimed"]["pid"] != runtimed
    assert status["runtimed"]["restarts"] == 1
    assert status["frontend"]["pid"] == frontend


def test_each_service_holds_exactly_its_declared_capabilities(stack: Stack) -> None:
    available = privileges.bounding_capabilities()
    status = stack.status()
    for name in START_ORDER:
        declared = service_class(name).capabilities
        expected = available if declared is None else frozenset(declared) & available
        sets = privileges.read_status_sets(status[name]["pid"])
        assert sets["CapEff"] == expected, name
        assert sets["CapPrm"] == expected, name
        assert sets["CapBnd"] == expected, name
        assert sets["CapInh"] == frozenset() and sets["CapAmb"] == frozenset(), name
        assert set(status[name]["capabilities"]) == expected, name


def test_status_command_reports_every_service(stack: Stack) -> None:
    result = criopy(stack.dirs, "status")
    assert result.returncode == 0, result.stderr
    for name in START_ORDER:
        assert name in result.stdout


def test_restart_command_restarts_one_service(stack: Stack) -> None:
    imaged = stack.pid("imaged")
    result = criopy(stack.dirs, "restart", "imaged")
    assert result.returncode == 0, result.stderr
    assert wait_for(lambda: stack.status()["imaged"].get("pid") not in (None, imaged))
    assert conditions(stack)["RuntimeReady"].status is True


def test_sigterm_stops_every_service(stack: Stack) -> None:
    pids = [stack.pid(name) for name in START_ORDER]
    assert stack.stop() == 0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_one_cri_call_is_one_trace_across_processes(dirs) -> None:  # type: ignore[no-untyped-def]
    from tests.support.stack import start_stack

    (dirs.cni / "10-test.conflist").write_text('{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"loopback"}]}')
    s = start_stack(dirs, "--set", "crio.tracing.enable_tracing=true",
                    "--set", 'crio.tracing.tracing_exporter="console"')
    try:
        # Verbose: it asks the daemons now (a plain Status answers from the read model's health probes).
        s.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=5)
    finally:
        s.stop()
    spans = [json.loads(line) for line in s.logs().splitlines() if line.startswith('{"name"')]
    status_spans = [sp for sp in spans if sp["name"] == "/runtime.v1.RuntimeService/Status"]
    assert status_spans, s.logs()[-2000:]
    trace_id = status_spans[-1]["context"]["trace_id"]
    in_trace = [sp for sp in spans if sp["context"]["trace_id"] == trace_id]
    services = {sp["resource"]["attributes"]["service.name"] for sp in in_trace}
    assert {"criopy-frontend", "criopy-runtimed", "criopy-netd"} <= services
    by_id = {sp["context"]["span_id"]: sp for sp in in_trace}
    daemon_span = next(sp for sp in in_trace if sp["name"] == "runtimed/health")
    client_span = by_id[daemon_span["parent_id"]]
    assert client_span["name"] == "bus runtimed.health"
    assert by_id[client_span["parent_id"]]["name"] == "/runtime.v1.RuntimeService/Status"


def test_services_without_network_have_their_own_empty_network_namespace(stack: Stack) -> None:
    status = stack.status()
    host_netns = os.readlink("/proc/self/ns/net")
    for name in START_ORDER:
        netns = os.readlink(f"/proc/{status[name]['pid']}/ns/net")
        if service_class(name).network:
            assert netns == host_netns, name
        else:
            assert netns != host_netns, name
            links = open(f"/proc/{status[name]['pid']}/net/dev").read().splitlines()[2:]
            assert [line.split(":")[0].strip() for line in links] == ["lo"], name


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _name(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_services_are_forked_from_the_fork_server_restarts_too(stack: Stack) -> None:
    pids = {name: stack.pid(name) for name in START_ORDER}
    servers = {_parent(pid) for pid in pids.values()}
    assert len(servers) == 1
    server = servers.pop()
    assert _name(server) == "criopy-forks" and _parent(server) == stack.process.pid
    assert {name: _name(pid) for name, pid in pids.items()} == {name: f"criopy-{name}" for name in START_ORDER}
    os.kill(pids["netd"], signal.SIGKILL)
    assert wait_for(lambda: stack.status()["netd"].get("pid") not in (None, pids["netd"]))
    status = stack.status()["netd"]
    assert _parent(status["pid"]) == server
    assert status["last_exit"] == -signal.SIGKILL  # the server tells the supervisor each exit status


def test_without_the_fork_server_each_service_is_a_new_interpreter(dirs) -> None:  # type: ignore[no-untyped-def]
    from tests.support.stack import start_stack

    s = start_stack(dirs, "--set", "criopy.supervisor.fork_services=false")
    try:
        for name in START_ORDER:
            pid = s.pid(name)
            assert _parent(pid) == s.process.pid, name
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert f.read().split(b"\0")[-3:] == [b"service", name.encode(), b""], name
        assert conditions(s)["RuntimeReady"].status is True
    finally:
        assert s.stop() == 0
