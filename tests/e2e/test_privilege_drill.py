"""The privilege drill: a process with each service's exact credentials tries every socket of `criopy run`.

Against the default configuration (in temp dirs): for each of the five
services, an impostor (tests/support/impostor.py) takes the uid, gids and
capability sets `criopy status` reports for it, then tries each daemon's bus
socket with a call that would change something, the daemons' event and
stream sockets, the supervisor's socket with a restart, and the CRI socket.
The one edge the table allows (the frontend to the daemons) works; every
other attempt fails to connect or is refused, and afterwards nothing has
changed: no file, no mount, no restarted service, no pod.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cri_api.v1 import api_pb2

from shared.config import Config
from shared.services import DAEMONS, START_ORDER
from tests.support.stack import REPO, Dirs, Stack

pytestmark = pytest.mark.root

# For each daemon, a call that would write something if it ran.
WRITES = {
    "storaged": ("create_rootfs", {"container_id": "drill-rootfs"}),
    "imaged": ("remove_image", {"reference": "docker.io/library/busybox:latest"}),
    "netd": ("update_pod_cidr", {"cidr": "10.98.0.0/16"}),
    "runtimed": ("reserve_sandbox", {"config": {"metadata": {"name": "drill", "namespace": "drill",
                                                             "uid": "drill", "attempt": 0}}}),
}
EVENTS = ("storaged", "runtimed")
STREAMS = ("netd", "runtimed")


def stack_config(dirs: Dirs) -> Config:
    config = Config()
    config.crio.root, config.crio.runroot = str(dirs.root), str(dirs.runroot)
    config.crio.api.listen = str(dirs.socket)
    return config


def impersonate(status: dict[str, Any], probes: list[dict[str, Any]], timeout: float = 300) -> dict[str, Any]:
    """Run the probes in a process with the credentials `status` reports for one service."""
    credentials = {key: status[key] for key in ("uid", "gid", "groups", "capability_sets")}
    done = subprocess.run([sys.executable, "-m", "tests.support.impostor"], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, input=json.dumps({"credentials": credentials, "probes": probes}))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    for key in ("uid", "gid", "groups", "capability_sets"):
        assert report["credentials"][key] == status[key], (key, report["credentials"][key], status[key])
    return report


def probes_for(service: str, config: Config) -> list[tuple[str, dict[str, Any]]]:
    """(what, probe) for every socket; the frontend calls health where the others try a write."""
    probes = []
    for daemon in DAEMONS:
        method, params = ("health", {}) if service == "frontend" else WRITES[daemon]
        probes.append((f"{daemon} bus", {"kind": "bus", "path": config.bus_endpoint(daemon).removeprefix("ipc://"),
                                         "method": method, "params": params}))
    for daemon in EVENTS:
        probes.append((f"{daemon} events", {"kind": "events",
                                            "path": config.events_endpoint(daemon).removeprefix("ipc://")}))
    for daemon in STREAMS:
        probes.append((f"{daemon} streams", {"kind": "stream", "path": str(config.stream_socket(daemon))}))
    probes.append(("supervisor bus", {"kind": "bus", "method": "restart", "params": {"service": "imaged"},
                                      "path": config.bus_endpoint("supervisor").removeprefix("ipc://")}))
    probes.append(("CRI socket", {"kind": "connect", "path": config.crio.api.listen}))
    return probes


def allowed(service: str, what: str) -> bool:
    return service == "frontend" and what.split()[0] in DAEMONS


def refused(result: dict[str, Any]) -> bool:
    """Failed to connect, or connected and was turned away by the credentials check."""
    if result["connect"] != "ok":
        return result["connect"] == "EACCES"
    return (result.get("reply") == "PERMISSION_DENIED" or result.get("handshake") == "refused"
            or "may not open" in (result.get("end") or ""))


def worked(result: dict[str, Any]) -> bool:
    return result["connect"] == "ok" and (
        result.get("reply") == "OK" or result.get("handshake") == "succeeded"
        or "not found" in (result.get("end") or ""))


def snapshot(dirs: Dirs) -> set[str]:
    found = set()
    for top in (dirs.root, dirs.runroot, dirs.logs):
        for base, subdirs, files in os.walk(top):
            found.update(os.path.join(base, name) for name in subdirs + files)
    return found


def mounts_below(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f if line.split()[4].startswith(str(base)))


def test_each_service_reaches_exactly_what_the_table_allows(stack: Stack) -> None:
    config = stack_config(stack.dirs)
    status = stack.status()
    pids = {name: status[name]["pid"] for name in START_ORDER}
    files, mounts = snapshot(stack.dirs), mounts_below(stack.dirs.base)

    outcomes: dict[str, dict[str, dict[str, Any]]] = {}
    for service in START_ORDER:
        probes = probes_for(service, config)
        report = impersonate(status[service], [probe for _, probe in probes])
        outcomes[service] = {what: result for (what, _), result in zip(probes, report["results"])}

    for service, results in outcomes.items():
        for what, result in results.items():
            if what == "CRI socket":
                continue
            if allowed(service, what):
                assert worked(result), (service, what, result)
            else:
                assert refused(result), (service, what, result)
    # The CRI socket is root's, 0660: the unprivileged services cannot connect. The root daemons
    # can, as any uid-0 process (deploy/README.md): gRPC gives the server no peer credentials.
    for service in ("frontend", "imaged"):
        assert outcomes[service]["CRI socket"]["connect"] == "EACCES", service
    # The root daemons got through the file system to the bus sockets, and were refused by credentials.
    for service in ("storaged", "netd", "runtimed"):
        assert outcomes[service]["runtimed bus"]["reply"] == "PERMISSION_DENIED", service
        assert outcomes[service]["supervisor bus"]["reply"] == "PERMISSION_DENIED", service
    # imaged reaches its own socket, and may not call itself.
    assert outcomes["imaged"]["imaged bus"]["reply"] == "PERMISSION_DENIED"

    # Nothing ran.
    after = stack.status()
    assert {name: after[name]["pid"] for name in START_ORDER} == pids
    assert snapshot(stack.dirs) == files
    assert mounts_below(stack.dirs.base) == mounts
    assert not stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    # Each refusal was logged with the caller's uid and pid.
    refusals = [json.loads(line) for line in stack.logs().splitlines() if '"caller_refused"' in line]
    assert {r["caller"] for r in refusals} >= {"storaged", "netd", "runtimed", "imaged"}
    assert all(r["peer"].startswith("uid ") and " pid " in r["peer"] for r in refusals)
