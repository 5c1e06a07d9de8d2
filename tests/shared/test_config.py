"""Configuration: files, drop-ins, environment, flags, and clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from shared.config import Config
from shared.config_load import ConfigSources, defaults_with_comments, load
from shared.errors import ConfigError
from tests.support.stack import Dirs, criopy


def sources(tmp_path: Path, main: str = "", **dropins: str) -> ConfigSources:
    (tmp_path / "criopy.conf").write_text(main)
    d = tmp_path / "criopy.conf.d"
    d.mkdir(exist_ok=True)
    for name, text in dropins.items():
        (d / f"{name}.conf").write_text(text)
    return ConfigSources(config_file=str(tmp_path / "criopy.conf"), config_dir=str(d))


def test_defaults_without_files(tmp_path: Path) -> None:
    config = load(ConfigSources(config_file=None, config_dir=str(tmp_path / "none")),
                  environ={"CRIOPY_CONFIG": ""})
    assert config.crio.root == "/var/lib/criopy"
    assert config.crio.runroot == "/run/criopy"
    assert config.crio.api.listen == "/run/criopy/criopy.sock"
    assert config.crio.runtime.cgroup_manager == "cgroupfs"
    assert config.bus_endpoint("netd") == "ipc:///run/criopy/bus/netd/bus.sock"
    assert config.stream_socket("runtimed") == Path("/run/criopy/bus/runtimed/streams.sock")
    assert config.lock_file("frontend") == Path("/run/criopy/criopy.sock.lock")
    assert config.crio.api.listen_group == "" and config.crio.api.listen_mode == "0660"
    assert (config.criopy.users.frontend, config.criopy.users.imaged) == ("criopy-frontend", "criopy-imaged")


def test_dropins_apply_in_lexical_order_over_the_main_file(tmp_path: Path) -> None:
    s = sources(
        tmp_path,
        '[crio.runtime]\nlog_level = "warning"\ncgroup_manager = "cgroupfs"\n',
        **{"20-late": '[crio.runtime]\nlog_level = "debug"\n',
           "10-early": '[crio.runtime]\nlog_level = "error"\n[crio.network]\nnetwork_dir = "/x"\n'})
    config = load(s, environ={})
    assert config.crio.runtime.log_level == "debug"
    assert config.crio.network.network_dir == "/x"


def test_a_dropin_adding_a_runtime_handler_keeps_the_default(tmp_path: Path) -> None:
    s = sources(tmp_path, "", extra='[crio.runtime.runtimes.kata]\nruntime_path = "/usr/bin/kata"\n')
    config = load(s, environ={})
    assert set(config.crio.runtime.runtimes) == {"runc", "kata"}
    assert config.crio.runtime.runtimes["kata"].runtime_path == "/usr/bin/kata"
    assert config.crio.runtime.runtimes["kata"].monitor_path == "/usr/bin/conmon"


def test_environment_beats_files_and_flags_beat_environment(tmp_path: Path) -> None:
    s = sources(tmp_path, '[crio]\nroot = "/from/file"\nrunroot = "/from/file/run"\n')
    assert load(s, environ={}).crio.root == "/from/file"
    assert load(s, environ={"CRIOPY_ROOT": "/from/env"}).crio.root == "/from/env"
    s.overrides = {"crio.root": "/from/flag"}
    assert load(s, environ={"CRIOPY_ROOT": "/from/env"}).crio.root == "/from/flag"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    s = sources(tmp_path, "", **{"50-typo": '[crio.runtime]\ncgroup_manger = "systemd"\n'})
    with pytest.raises(ConfigError) as info:
        load(s, environ={})
    assert "50-typo.conf" in info.value.message
    assert "crio.runtime.cgroup_manger" in info.value.message
    assert "unknown key" in info.value.message


@pytest.mark.parametrize("text, where, problem", [
    ('[crio.metrics]\nmetrics_port = "9090"\n', "crio.metrics.metrics_port", "must be int"),
    ('[crio.runtime]\ndefault_capabilities = "CHOWN"\n', "crio.runtime.default_capabilities", "must be a list"),
    ('[crio.network]\nplugin_dirs = [1]\n', "crio.network.plugin_dirs[0]", "must be str"),
    ("[crio]\napi = 3\n", "crio.api", "must be a table"),
    ('[crio.metrics]\nenable_metrics = "yes"\n', "crio.metrics.enable_metrics", "must be bool"),
])
def test_wrong_type_names_file_key_and_problem(tmp_path: Path, text: str, where: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(sources(tmp_path, text), environ={})
    assert str(tmp_path / "criopy.conf") in info.value.message
    assert where in info.value.message
    assert problem in info.value.message


def test_invalid_values_and_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cgroup_manager: must be 'cgroupfs' or 'systemd'"):
        load(sources(tmp_path, '[crio.runtime]\ncgroup_manager = "nope"\n'), environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(sources(tmp_path, "[crio\n"), environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load(ConfigSources(config_file=str(tmp_path / "missing.conf")), environ={})


def test_bad_flag_value_is_reported_as_such(tmp_path: Path) -> None:
    s = sources(tmp_path)
    s.overrides = {"crio.metrics.metrics_port": "abc"}
    with pytest.raises(ConfigError, match="command line or environment: crio.metrics.metrics_port"):
        load(s, environ={})


def test_effective_config_prints_as_toml_that_loads_back(dirs: Dirs) -> None:
    (dirs.config_dir / "10-level.conf").write_text('[crio.runtime]\nlog_level = "debug"\n')
    result = criopy(dirs, "config")
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    assert printed["crio"]["runtime"]["log_level"] == "debug"
    assert printed["crio"]["root"] == str(dirs.root)
    # The printed configuration is itself a valid configuration file.
    dirs.config_file.write_text(result.stdout)
    for f in dirs.config_dir.iterdir():
        f.unlink()
    again = criopy(dirs, "config")
    assert tomllib.loads(again.stdout) == printed


def test_defaults_are_printed_with_a_comment_per_option() -> None:
    text = defaults_with_comments()
    parsed = tomllib.loads(text)
    assert parsed == tomllib.loads(Config().to_toml())
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 3, line


def test_start_up_stops_on_a_broken_file(dirs: Dirs) -> None:
    (dirs.config_dir / "99-bad.conf").write_text('[crio.api]\nlisten = 5\n')
    result = criopy(dirs, "run", timeout=20)
    assert result.returncode == 2
    assert "99-bad.conf" in result.stderr and "crio.api.listen" in result.stderr
    assert not dirs.socket.exists()
