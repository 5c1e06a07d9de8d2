"""The systemd units in deploy/ express the same privileges as the services declare."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from shared.services import DAEMONS, START_ORDER, service_class
from tests.support.stack import REPO

UNITS = REPO / "deploy" / "systemd"


def unit(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment]
    parser.read(UNITS / f"criopy-{name}.service")
    return parser["Service"]


@pytest.mark.parametrize("name", START_ORDER)
def test_unit_runs_the_service_with_its_capabilities(name: str) -> None:
    service = unit(name)
    assert service["ExecStart"].endswith(f"criopy service {name}")
    declared = service_class(name).capabilities
    if declared is None:
        assert "CapabilityBoundingSet" not in service  # runtimed keeps what the machine grants
    else:
        assert set(service["CapabilityBoundingSet"].split()) == set(declared)
        assert service["AmbientCapabilities"] == ""
        assert service["NoNewPrivileges"] == "yes"


@pytest.mark.parametrize("name", ["frontend", "imaged"])
def test_services_without_capabilities_run_unprivileged(name: str) -> None:
    service = unit(name)
    assert service["User"] != "root"
    assert service["ProtectSystem"] == "strict"


def test_storaged_has_no_network_and_its_mounts_reach_the_host() -> None:
    service = unit("storaged")
    assert service["PrivateNetwork"] == "yes"
    assert service["MountFlags"] == "shared"


def test_target_wants_every_service() -> None:
    text = (UNITS / "criopy.target").read_text()
    for name in START_ORDER:
        assert f"criopy-{name}.service" in text
    assert len(DAEMONS) == 4
