"""Live configuration changes (SIGHUP, `criopy reload`).

The files are read again; a broken file is refused and the running
configuration stays. Options that can change live are copied into the running
Config object in place (so every module that reads `config.crio...` when it
works sees the new value); any other change is reported as needing a restart
of the service.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from shared.config import Config
from shared.config_load import ConfigSources, load

# Dotted option paths (or table prefixes) that take effect without a restart.
RELOADABLE: tuple[str, ...] = (
    "crio.runtime.log_level",
    "criopy.log.",
    "crio.image.registries_conf",
    "crio.image.global_auth_file",
    "crio.image.insecure_registries",
    "crio.image.max_parallel_downloads",
    "crio.image.pause_image",
    "crio.network.network_dir",
    "crio.network.plugin_dirs",
    "crio.network.cni_default_network",
    "crio.network.cni_timeout",
    "crio.metrics.",
    "crio.tracing.",
    "crio.stats.",
    "crio.runtime.default_capabilities",
    "crio.runtime.default_sysctls",
    "crio.runtime.default_env",
    "crio.runtime.default_ulimits",
    "crio.runtime.seccomp_profile",
    "crio.runtime.allowed_devices",
    "crio.runtime.runtimes",
    "crio.runtime.log_size_max",
    "criopy.bus.health_timeout",
    "criopy.bus.default_timeout",
    "criopy.supervisor.",
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(value):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            out.update(_flatten(getattr(value, f.name), f"{prefix}{f.name}."))
        return out
    return {prefix.rstrip("."): value}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def diff(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Options whose value differs, by dotted path (runtime handlers compare as one option)."""
    a, b = _flatten(old), _flatten(new)
    return {path: (a.get(path), b.get(path)) for path in sorted(set(a) | set(b)) if a.get(path) != b.get(path)}


def is_reloadable(path: str) -> bool:
    return any(path == r or (r.endswith(".") and path.startswith(r)) for r in RELOADABLE)


def _assign(config: Config, path: str, value: Any) -> None:
    *tables, key = path.split(".")
    node: Any = config
    for table in tables:
        node = getattr(node, table)
    setattr(node, key, value)


@dataclasses.dataclass
class ReloadResult:
    applied: dict[str, tuple[Any, Any]]
    needs_restart: dict[str, tuple[Any, Any]]

    def describe(self) -> dict[str, Any]:
        """The report, as plain maps and lists (it travels over the bus)."""
        return {
            "applied": {k: {"old": _plain(o), "new": _plain(n)} for k, (o, n) in self.applied.items()},
            "needs_restart": sorted(self.needs_restart),
        }


def reload_into(config: Config, sources: ConfigSources) -> ReloadResult:
    """Read the configuration again and apply its live options to `config`.

    Raises ConfigError (and changes nothing) when the files are broken.
    """
    new = load(sources)
    changes = diff(config, new)
    applied = {p: c for p, c in changes.items() if is_reloadable(p)}
    for path, (_old, value) in applied.items():
        _assign(config, path, value)
    return ReloadResult(applied, {p: c for p, c in changes.items() if p not in applied})
