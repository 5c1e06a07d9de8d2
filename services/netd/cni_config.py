"""CNI network configurations: reading, checking and picking one from a directory.

Files with the extensions libcni reads (.conf, .conflist, .json) are taken
in lexical order; the first valid one wins, or the one named by
`cni_default_network`. A single-plugin `.conf` becomes a one-plugin list.
Invalid files are skipped, each with a reason.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

EXTENSIONS = (".conf", ".conflist", ".json")
# The CNI specification versions this runtime speaks.
SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0")
_NETWORK_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_PLUGIN_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAX_FILE_BYTES = 1024 * 1024


def version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (0,)


@dataclass(frozen=True)
class NetworkList:
    """One network configuration list, as the plugins will receive it."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    source: str            # file it came from
    raw: str               # the list as JSON text (cached with results, reused by DEL)
    disable_check: bool = False

    @property
    def plugin_types(self) -> list[str]:
        return [p["type"] for p in self.plugins]


@dataclass
class ConfigScan:
    """The outcome of reading a configuration directory."""

    network: NetworkList | None
    reason: str = ""
    message: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it was skipped


class InvalidNetworkConfig(ValueError):
    pass


def parse_network_list(data: dict[str, Any], source: str) -> NetworkList:
    """Check a decoded `.conflist` (or `.conf`, wrapped by the caller) and build it."""
    if not isinstance(data, dict):
        raise InvalidNetworkConfig("not a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not _NETWORK_NAME_RE.match(name):
        raise InvalidNetworkConfig(f"'name' must be a network name, not {name!r:.60}")
    version = data.get("cniVersion")
    if not isinstance(version, str):
        raise InvalidNetworkConfig("'cniVersion' is missing or not a string")
    if version not in SUPPORTED_VERSIONS:
        raise InvalidNetworkConfig(
            f"cniVersion {version!r:.20} is not supported (supported: {', '.join(SUPPORTED_VERSIONS)})")
    plugins = data.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise InvalidNetworkConfig("'plugins' must be a non-empty list")
    for i, plugin in enumerate(plugins):
        if not isinstance(plugin, dict):
            raise InvalidNetworkConfig(f"plugins[{i}] is not a JSON object")
        ptype = plugin.get("type")
        if not isinstance(ptype, str) or not _PLUGIN_TYPE_RE.match(ptype):
            raise InvalidNetworkConfig(f"plugins[{i}].type must be a plugin name, not {ptype!r:.60}")
        caps = plugin.get("capabilities", {})
        if not isinstance(caps, dict):
            raise InvalidNetworkConfig(f"plugins[{i}].capabilities must be an object")
    disable_check = data.get("disableCheck", False)
    if isinstance(disable_check, str):  # libcni accepts "true"/"false" strings
        disable_check = disable_check.lower() == "true"
    return NetworkList(
        name=name, cni_version=version, plugins=tuple(plugins), source=source,
        raw=json.dumps(data, sort_keys=True), disable_check=bool(disable_check))


def load_file(path: Path) -> NetworkList:
    """Read one configuration file; raises InvalidNetworkConfig with the reason."""
    try:
        with open(path, "rb") as f:
            text = f.read(_MAX_FILE_BYTES + 1)
    except OSError as e:
        raise InvalidNetworkConfig(f"cannot read: {e.strerror}") from None
    if len(text) > _MAX_FILE_BYTES:
        raise InvalidNetworkConfig(f"larger than {_MAX_FILE_BYTES} bytes")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidNetworkConfig(f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidNetworkConfig("not a JSON object")
    if path.suffix != ".conflist":
        if "plugins" in data:
            raise InvalidNetworkConfig("a network list ('plugins') in a single-network file; name it .conflist")
        if not data.get("type"):
            raise InvalidNetworkConfig("single-network configuration without 'type'")
        data = {
            "cniVersion": data.get("cniVersion"),
            "name": data.get("name"),
            "plugins": [{k: v for k, v in data.items() if k not in ("cniVersion", "name")}],
        }
    return parse_network_list(data, str(path))


def find_plugin(plugin_type: str, plugin_dirs: list[str]) -> Path | None:
    """First executable regular file named `plugin_type` in the plugin directories."""
    for d in plugin_dirs:
        candidate = Path(d) / plugin_type
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def config_files(conf_dir: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(conf_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [conf_dir / n for n in names if os.path.splitext(n)[1] in EXTENSIONS and (conf_dir / n).is_file()]


def scan(conf_dir: Path, plugin_dirs: list[str], default_network: str = "") -> ConfigScan:
    """Pick the network to use from `conf_dir` (see module doc)."""
    files = config_files(conf_dir)
    skipped: dict[str, str] = {}
    for path in files:
        try:
            network = load_file(path)
            missing = [t for t in network.plugin_types if find_plugin(t, plugin_dirs) is None]
            if missing:
                raise InvalidNetworkConfig(
                    f"plugin {', '.join(missing)} not found in {', '.join(plugin_dirs)}")
        except InvalidNetworkConfig as e:
            skipped[str(path)] = str(e)
            continue
        if default_network and network.name != default_network:
            continue
        return ConfigScan(network=network, skipped=skipped)
    if default_network:
        message = f"no valid CNI network named {default_network!r} in {conf_dir}"
    elif files:
        message = f"no valid CNI configuration in {conf_dir}"
    else:
        message = f"no CNI configuration file in {conf_dir}. Has your network provider started?"
    if skipped:
        message += " (skipped: " + "; ".join(f"{Path(f).name}: {why}" for f, why in skipped.items()) + ")"
    return ConfigScan(network=None, reason="NetworkPluginNotReady",
                      message=f"Network plugin returns error: {message}", skipped=skipped)
