"""Building the configuration from its sources, each one checked.

Sources, later ones winning: built-in defaults, the main TOML file
(/etc/criopy/criopy.conf), every `*.conf` file of the drop-in directory
(/etc/criopy/criopy.conf.d/) in lexical order, environment variables, and
command-line flags. An unknown key or a wrong type stops start-up with a
message naming the file, the key and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from shared.config import Config
from shared import ulimits
from shared.errors import ConfigError

DEFAULT_CONFIG_FILE = "/etc/criopy/criopy.conf"
DEFAULT_CONFIG_DIR = "/etc/criopy/criopy.conf.d"

# Overrides from the environment and flags: option path -> (flag, variable).
OVERRIDES: dict[str, tuple[str, str]] = {
    "crio.root": ("--root", "CRIOPY_ROOT"),
    "crio.runroot": ("--runroot", "CRIOPY_RUNROOT"),
    "crio.log_dir": ("--log-dir", "CRIOPY_LOG_DIR"),
    "crio.api.listen": ("--listen", "CRIOPY_LISTEN"),
    "crio.runtime.log_level": ("--log-level", "CRIOPY_LOG_LEVEL"),
    "crio.runtime.cgroup_manager": ("--cgroup-manager", "CRIOPY_CGROUP_MANAGER"),
    "crio.network.network_dir": ("--cni-config-dir", "CRIOPY_CNI_CONFIG_DIR"),
    "crio.network.netns_dir": ("--netns-dir", "CRIOPY_NETNS_DIR"),
    "crio.image.registries_conf": ("--registries-conf", "CRIOPY_REGISTRIES_CONF"),
    "criopy.log.log_format": ("--log-format", "CRIOPY_LOG_FORMAT"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(tp: Any, value: Any, where: str) -> Any:
    """Check one value against a field's type and return it (tables become dataclasses)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a table, not {type(value).__name__}")
        return _build(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list of {_type_name(item_tp)}, not {type(value).__name__}")
        return [_check_value(item_tp, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        _key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a table, not {type(value).__name__}")
        return {k: _check_value(value_tp, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError("union types are not used in the configuration")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: must be an integer, not a boolean")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: must be {_type_name(tp)}, not {type(value).__name__} ({value!r:.60})")
    return value


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{where}.{key}: unknown key (known here: {known})".lstrip("."))
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _check_value(hints[key], value, f"{where}.{key}".lstrip("."))
    return cls(**kwargs)


def _merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *tables, key = dotted.split(".")
    node = data
    for t in tables:
        node = node.setdefault(t, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {t} is not a table")
    node[key] = value


def parse_override_value(text: str) -> Any:
    """A command-line or environment value: a TOML literal if it parses as one, else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "fatal", "panic")


def _validate(config: Config) -> None:
    rt = config.crio.runtime
    if rt.cgroup_manager not in ("cgroupfs", "systemd"):
        raise ConfigError(f"crio.runtime.cgroup_manager: must be 'cgroupfs' or 'systemd', not {rt.cgroup_manager!r}")
    if rt.default_runtime not in rt.runtimes:
        raise ConfigError(f"crio.runtime.default_runtime: {rt.default_runtime!r} is not in crio.runtime.runtimes")
    for entry in rt.default_ulimits:
        try:
            ulimits.parse(entry)
        except ValueError as e:
            raise ConfigError(f"crio.runtime.default_ulimits: {e}") from None
    if rt.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"crio.runtime.log_level: unknown level {rt.log_level!r}")
    from shared.services import SERVICE_CLASSES

    for service, level in config.criopy.log.service_log_levels.items():
        if service not in SERVICE_CLASSES and service != "supervisor":
            raise ConfigError(f"criopy.log.service_log_levels.{service}: no such service")
        if level.lower() not in _LOG_LEVELS:
            raise ConfigError(f"criopy.log.service_log_levels.{service}: unknown level {level!r}")
    if config.criopy.log.log_format not in ("auto", "json", "console"):
        raise ConfigError(f"criopy.log.log_format: must be auto, json or console, not {config.criopy.log.log_format!r}")
    if config.crio.tracing.tracing_exporter not in ("otlp", "console"):
        raise ConfigError(f"crio.tracing.tracing_exporter: must be 'otlp' or 'console'")
    try:
        int(config.crio.api.listen_mode, 8)
    except ValueError:
        raise ConfigError(f"crio.api.listen_mode: not an octal mode: {config.crio.api.listen_mode!r}") from None
    if not os.path.isabs(config.crio.root) or not os.path.isabs(config.crio.runroot):
        raise ConfigError("crio.root and crio.runroot must be absolute paths")


@dataclass
class ConfigSources:
    """Where the configuration comes from; handed to child services unchanged."""

    config_file: str | None = None
    config_dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # option path -> value, from flags

    def argv(self) -> list[str]:
        """Command-line flags that rebuild these sources in a child process."""
        args: list[str] = []
        if self.config_file is not None:
            args += ["--config", self.config_file]
        if self.config_dir is not None:
            args += ["--config-dir", self.config_dir]
        for path, value in self.overrides.items():
            args += ["--set", f"{path}={_toml_literal(value)}"]
        return args


def _toml_literal(value: Any) -> str:
    if isinstance(value, dict):  # inline, so it fits on one option's line
        items = ", ".join(f"{json.dumps(str(k))} = {_toml_literal(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def load(sources: ConfigSources, environ: Mapping[str, str] | None = None) -> Config:
    """Build the effective configuration from files, environment and flags."""
    env = os.environ if environ is None else environ
    config_file = sources.config_file or env.get("CRIOPY_CONFIG") or DEFAULT_CONFIG_FILE
    config_dir = sources.config_dir or env.get("CRIOPY_CONFIG_DIR") or DEFAULT_CONFIG_DIR
    explicit_file = bool(sources.config_file or env.get("CRIOPY_CONFIG"))

    # Files merge into the defaults table by table, so a drop-in that adds a
    # runtime handler keeps the default one.
    data: dict[str, Any] = Config().to_dict()
    files: list[Path] = []
    main = Path(config_file)
    if main.exists():
        files.append(main)
    elif explicit_file:
        raise ConfigError(f"{main}: configuration file does not exist")
    dropins = Path(config_dir)
    if dropins.is_dir():
        files.extend(sorted(p for p in dropins.iterdir() if p.suffix == ".conf" and p.is_file()))

    for path in files:
        layer = _read_toml(path)
        try:
            _build(Config, layer, "")  # check this file on its own so errors name it
        except ConfigError as e:
            raise ConfigError(f"{path}: {e.message}") from None
        data = _merge(data, layer)

    overlay: dict[str, Any] = {}
    for dotted, (_flag, var) in OVERRIDES.items():
        if var in env:
            _set_path(overlay, dotted, parse_override_value(env[var]))
    for dotted, value in sources.overrides.items():
        _set_path(overlay, dotted, value)
    try:
        _build(Config, overlay, "")
    except ConfigError as e:
        raise ConfigError(f"command line or environment: {e.message}") from None
    data = _merge(data, overlay)

    config = _build(Config, data, "")
    _validate(config)
    return config


def defaults_with_comments() -> str:
    """The default configuration as TOML, each option preceded by its description."""
    lines: list[str] = ["# crio-py configuration: every option with its default."]

    def emit(obj: Any, table: str) -> None:
        scalars = []
        subtables = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                subtables.append((f.name, value))
            elif isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
                subtables.extend((f"{f.name}.{k}", v) for k, v in value.items())
            else:
                scalars.append((f, value))
        if scalars:
            lines.append("")
            if table:
                lines.append(f"[{table}]")
            for f, value in scalars:
                lines.append(f"# {f.metadata.get('doc', '')}")
                lines.append(f"{f.name} = {_toml_literal(value)}")
        for name, sub in subtables:
            emit(sub, f"{table}.{name}" if table else name)

    emit(Config(), "")
    return "\n".join(lines) + "\n"
