"""deploy/: the systemd units and the compose file express the privileges the services declare."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.services import DAEMONS, START_ORDER, service_class
from tests.support.stack import REPO

UNITS = REPO / "deploy" / "systemd"
COMPOSE = REPO / "docker-compose.test.yml"


def unit(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment]
    parser.read(UNITS / f"criopy-{name}.service")
    return parser["Service"]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.parametrize("name", START_ORDER)
def test_unit_runs_the_service_with_its_capabilities(name: str) -> None:
    service = unit(name)
    assert service["ExecStart"].endswith(f"criopy service {name}")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    declared = service_class(name).capabilities
    if declared is None:
        assert "CapabilityBoundingSet" not in service  # runtimed keeps what the machine grants
    else:
        assert set(service["CapabilityBoundingSet"].split()) == set(declared)
        assert service["AmbientCapabilities"] == ""
        assert service["NoNewPrivileges"] == "yes"


@pytest.mark.parametrize("name", ["frontend", "imaged"])
def test_services_without_capabilities_run_unprivileged_and_confined(name: str) -> None:
    service = unit(name)
    assert service["User"] != "root"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes"
    writable = service["ReadWritePaths"].split()
    assert all(p.startswith(("/run/criopy", f"/var/lib/criopy/{name}")) for p in writable), writable


def test_storaged_has_no_network_and_its_mounts_reach_the_host() -> None:
    service = unit("storaged")
    assert service["PrivateNetwork"] == "yes"
    assert service["MountFlags"] == "shared"


def test_target_wants_every_service() -> None:
    text = (UNITS / "criopy.target").read_text()
    for name in START_ORDER:
        assert f"criopy-{name}.service" in text
    assert len(DAEMONS) == 4


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this checkout's criopy.
    criopy = Path(sys.executable).with_name("criopy")
    for path in UNITS.iterdir():
        text = path.read_text().replace("/usr/local/bin/criopy", str(criopy))
        (tmp_path / path.name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.iterdir())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_compose_runs_each_service_with_the_units_capabilities() -> None:
    services = compose()["services"]
    assert {"registry", "otel-collector"} <= set(services)
    for name in START_ORDER:
        spec = services[name]
        assert spec["command"] == ["criopy", "service", name]
        declared = service_class(name).capabilities
        if declared is None:
            assert spec.get("privileged") is True
            continue
        assert spec["cap_drop"] == ["ALL"]
        assert {f"CAP_{c}" for c in spec.get("cap_add", [])} == set(declared)
        unit_caps = set(unit(name).get("CapabilityBoundingSet", "").split())
        assert unit_caps == set(declared)


def test_compose_shares_the_bus_and_isolates_storaged() -> None:
    doc = compose()
    services = doc["services"]
    assert "bus" in doc["volumes"]
    for name in START_ORDER:
        volumes = services[name]["volumes"]
        assert "bus:/run/criopy/bus" in volumes, name
    assert services["storaged"]["network_mode"] == "none"
    assert services["netd"]["network_mode"] == "host"
    assert services["runtimed"]["pid"] == "host"
