"""deploy/: the systemd units, sysusers, tmpfiles, README and compose file say what the code does.

Identities (shared/identities.py), directories (shared/layout.py), capabilities
(each service class) and the edge table (shared/bus/api.py) are the reference.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared import identities, layout
from shared.bus.api import API, FRONTEND, ROOT
from shared.config import Config
from shared.daemon import SWITCH_CAPABILITIES
from shared.services import DAEMONS, START_ORDER, service_class
from tests.support.stack import REPO

UNITS = REPO / "deploy" / "systemd"
COMPOSE = REPO / "docker-compose.test.yml"
DEPLOY_README = REPO / "deploy" / "README.md"


def launch_capabilities(name: str) -> set[str] | None:
    """What a unit leaves the service at start: what it keeps, and for the frontend, which binds as root
    and then changes user, what that takes and CAP_SETPCAP to empty its own bounding set."""
    cls = service_class(name)
    if cls.capabilities is None:
        return None
    caps = set(cls.capabilities)
    if cls.bind_capabilities:
        caps |= set(cls.bind_capabilities) | set(SWITCH_CAPABILITIES) | {"CAP_SETPCAP"}
    return caps


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
    # Ready when it says so (shared/notify.py), as under `criopy run`.
    assert service["Type"] == "notify"
    declared = launch_capabilities(name)
    if declared is None:
        assert "CapabilityBoundingSet" not in service  # runtimed keeps what the machine grants
    else:
        assert set(service["CapabilityBoundingSet"].split()) == declared
        assert service["AmbientCapabilities"] == ""
        assert service["NoNewPrivileges"] == "yes"


@pytest.mark.parametrize("name", START_ORDER)
def test_unit_starts_the_service_with_its_identity(name: str) -> None:
    service = unit(name)
    ident = identities.identity(name, Config())
    if service_class(name).bind_capabilities:
        # The frontend starts as root and becomes its user itself, once its socket is bound.
        assert service["User"] == "root" and ident.unprivileged
        assert "Group" not in service and "SupplementaryGroups" not in service
        return
    assert service["User"] == ident.user
    assert service.get("Group", "root") == ident.group
    assert tuple(service.get("SupplementaryGroups", "").split()) == ident.groups


@pytest.mark.parametrize("name", ["frontend", "imaged"])
def test_services_without_capabilities_run_unprivileged_and_confined(name: str) -> None:
    service = unit(name)
    assert identities.identity(name, Config()).unprivileged
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes"
    writable = service["ReadWritePaths"].split()
    assert all(p.startswith(("/run/criopy", f"/var/lib/criopy/{name}")) for p in writable), writable


def test_no_unit_declares_a_directory_that_holds_another_services_files() -> None:
    declared: dict[str, list[str]] = {}
    for name in START_ORDER:
        service = unit(name)
        assert "RuntimeDirectory" not in service, name  # deploy/criopy.tmpfiles.conf makes them
        declared[name] = [p for key in ("StateDirectory", "LogsDirectory", "CacheDirectory", "ConfigurationDirectory")
                          for p in service.get(key, "").split()]
    assert declared["imaged"] == ["criopy/imaged"]
    assert unit("imaged")["StateDirectoryMode"] == "0700"
    for name, paths in declared.items():
        for other, theirs in declared.items():
            for mine in paths:
                for path in theirs:
                    assert name == other or not (path + "/").startswith(mine + "/"), (name, mine, other, path)


def tmpfiles() -> dict[str, tuple[int, str, str]]:
    entries = {}
    for line in (REPO / "deploy" / "criopy.tmpfiles.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kind, path, mode, user, group, _age = line.split()
            assert kind == "d"
            entries[path] = (int(mode, 8), user, group)
    return entries


def test_tmpfiles_make_the_socket_directories_of_the_layout() -> None:
    config = Config()
    expected = {str(config.crio.runroot): (0o755, "root", "root"), str(config.bus_dir()): (0o755, "root", "root")}
    for name in DAEMONS:
        for d in layout.directories(name, config):
            if str(d.path).startswith(config.crio.runroot):
                expected[str(d.path)] = (d.mode, d.user, d.group)
    assert tmpfiles() == expected
    # Under systemd there is no supervisor: its directory is made by `criopy run` alone.
    assert all(not p.endswith("supervisor") for p in tmpfiles())


def test_sysusers_make_the_accounts_of_the_identities() -> None:
    groups, users = set(), {}
    for line in (REPO / "deploy" / "criopy.sysusers.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kind, name, *_ = line.split()
            if kind == "g":
                groups.add(name)
            elif kind == "u":
                users[name] = name  # a user line makes its group of the same name
    config = Config()
    assert groups | set(users) == {identities.group_of(name) for name in START_ORDER}
    assert set(users) == {identities.identity(name, config).user for name in START_ORDER} - {"root"}
    for name in START_ORDER:
        ident = identities.identity(name, config)
        assert ident.group in groups | set(users) | {"root"}


def readme_table(heading: str, path: Path = DEPLOY_README) -> list[list[str]]:
    """The rows of the first table after `heading` in a README (deploy/README.md), cells stripped of backquotes."""
    text = path.read_text()
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("`", "") for cell in line.strip("|").split("|")])
    return rows


def test_the_deploy_readme_names_each_services_identity_and_socket_directory() -> None:
    config = Config()
    rows = {row[0]: row for row in readme_table("## Who runs as whom")}
    assert set(rows) == set(START_ORDER)
    for name in START_ORDER:
        _service, user, group, groups, directory = rows[name][:5]
        ident = identities.identity(name, config)
        assert (user, group) == (ident.user, ident.group), name
        assert [g.strip() for g in groups.split(",") if g.strip() not in ("", "none")] == list(ident.groups), name
        dirs = [d for d in layout.directories(name, config) if str(d.path).startswith(str(config.bus_dir()))]
        if dirs:
            assert directory == f"{dirs[0].path} ({dirs[0].user}:{dirs[0].group} {dirs[0].mode:o})", name
        else:
            assert directory == "none", name


def test_the_deploy_readme_edge_table_is_the_api_table() -> None:
    edges = {(row[0], row[1]) for row in readme_table("## Who may call whom")}
    expected = set()
    for name, api in API.items():
        for caller in api.callers:
            expected.add(({FRONTEND: "frontend", ROOT: "root"}[caller], name))
    assert edges == expected


def test_the_readme_privilege_table_names_each_user_and_its_callers() -> None:
    rows = {row[0].split()[0]: row for row in readme_table("| process | owns | runs as", REPO / "README.md")}
    config = Config()
    assert set(rows) == set(START_ORDER) | {"supervisor"}
    for name, (_process, _owns, runs_as, _caps, accepts) in rows.items():
        ident = identities.identity(name, config)
        assert runs_as.startswith(ident.user) and all(g in runs_as for g in ident.groups if name != "frontend"), name
        callers = API[name].callers
        if name == "frontend":
            assert callers == frozenset() and "nobody on the bus" in accepts
        else:
            assert accepts == {frozenset({FRONTEND}): "the frontend", frozenset({ROOT}): "root (the criopy command)"}[
                callers], name


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
        declared = launch_capabilities(name)
        if declared is None:
            assert spec.get("privileged") is True
            continue
        assert spec["cap_drop"] == ["ALL"]
        assert {f"CAP_{c}" for c in spec.get("cap_add", [])} == declared
        unit_caps = set(unit(name).get("CapabilityBoundingSet", "").split())
        assert unit_caps == declared


@pytest.mark.parametrize("name", START_ORDER)
def test_compose_runs_each_service_as_its_unit_does(name: str) -> None:
    spec = compose()["services"][name]
    service = unit(name)
    user = service.get("User", "root")
    assert spec.get("user", "root:root").split(":")[0] == user
    assert spec.get("group_add", []) == service.get("SupplementaryGroups", "").split()


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


@pytest.mark.parametrize("name", ["runtimed", "frontend", "netd"])
def test_units_give_the_open_files_limit_crio_gives(name: str) -> None:
    """Containers inherit runtimed's limits through conmon; the frontend and netd hold a connection per stream."""
    from shared.limits import OPEN_FILES
    assert unit(name).get("LimitNOFILE") == str(OPEN_FILES)
    assert compose()["services"][name]["ulimits"]["nofile"] == {"soft": OPEN_FILES, "hard": OPEN_FILES}
