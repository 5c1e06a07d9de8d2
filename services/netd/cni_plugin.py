"""Running one CNI plugin binary, as the CNI specification describes.

The plugin gets its network configuration on stdin and the CNI_* variables in
its environment; it answers with a JSON result (ADD, VERSION), nothing (DEL,
CHECK) or a JSON error and a non-zero exit status. Each call has a timeout
after which the plugin and its children are killed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from opentelemetry.trace import Status, StatusCode

from services.netd.orphans import OWNER_ENV
from shared import metrics, programs, tracing
from shared.errors import DeadlineExceeded, Internal

log = structlog.get_logger(__name__)

# Plugins run iptables, tc and the like; they get a fixed, trusted PATH.
PLUGIN_PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MAX_OUTPUT_SHOWN = 300


@dataclass(frozen=True)
class Invocation:
    """The CNI_* environment of one call."""

    command: str                      # ADD, DEL, CHECK, VERSION
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: str = ""                    # CNI_ARGS, "K=V;K=V"
    plugin_dirs: tuple[str, ...] = ()
    owner: str = ""                   # marks the process as this netd's (see orphans)

    def environ(self) -> dict[str, str]:
        env = {"PATH": PLUGIN_PATH_ENV, "CNI_COMMAND": self.command,
               "CNI_PATH": os.pathsep.join(self.plugin_dirs)}
        if self.owner:
            env[OWNER_ENV] = self.owner
        if self.command != "VERSION":
            env.update(CNI_CONTAINERID=self.container_id, CNI_NETNS=self.netns,
                       CNI_IFNAME=self.ifname, CNI_ARGS=self.args)
        return env


class PluginError(Internal):
    """A plugin failed; the message names the plugin and the command."""

    def __init__(self, message: str, *, plugin: str, cni_code: int | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.cni_code = cni_code


class PluginTimeout(DeadlineExceeded):
    def __init__(self, message: str, *, plugin: str) -> None:
        super().__init__(message)
        self.plugin = plugin


def _shown(data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return text if len(text) <= _MAX_OUTPUT_SHOWN else text[:_MAX_OUTPUT_SHOWN] + "..."


async def run(plugin: Path, invocation: Invocation, stdin: bytes, timeout: float) -> dict[str, Any] | None:
    """Run `plugin` once; returns its decoded JSON output (None when it printed nothing)."""
    with tracing.tracer(__name__).start_as_current_span(
            f"cni {invocation.command} {plugin.name}",
            attributes={"cni.plugin": plugin.name, "cni.command": invocation.command,
                        "cni.container_id": invocation.container_id}) as span:
        started = time.monotonic()
        try:
            return await _run(plugin, invocation, stdin, timeout)
        except (PluginError, PluginTimeout) as e:
            span.set_status(Status(StatusCode.ERROR, e.message))
            raise
        finally:
            metrics.CNI_CALL_LATENCY.labels(plugin.name, invocation.command).observe(time.monotonic() - started)


async def _run(plugin: Path, invocation: Invocation, stdin: bytes, timeout: float) -> dict[str, Any] | None:
    name = plugin.name
    what = f"CNI plugin {name!r} {invocation.command}"
    try:
        # A session of its own: a timeout kills the plugin's children too.
        result = await programs.run([str(plugin)], timeout=timeout, input=stdin, env=invocation.environ(), cwd="/")
    except DeadlineExceeded:
        raise PluginTimeout(f"{what} timed out after {timeout:g}s and was killed", plugin=name) from None
    except Internal as e:
        raise PluginError(f"{what}: {e.message}", plugin=name) from None
    stdout, stderr = result.stdout, result.stderr
    if stderr.strip():
        log.debug("cni_plugin_stderr", plugin=name, command=invocation.command, stderr=_shown(stderr))
    if result.returncode != 0:
        raise _failure(what, name, result.returncode, stdout, stderr)
    if not stdout.strip():
        if invocation.command in ("ADD", "VERSION"):
            raise PluginError(f"{what} succeeded but printed no result", plugin=name)
        return None
    try:
        decoded = json.loads(stdout)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PluginError(f"{what} printed invalid JSON ({e}): {_shown(stdout)!r}", plugin=name) from None
    if not isinstance(decoded, dict):
        raise PluginError(f"{what} printed JSON that is not an object: {_shown(stdout)!r}", plugin=name)
    return decoded


def _failure(what: str, name: str, status: int, stdout: bytes, stderr: bytes) -> PluginError:
    try:
        err = json.loads(stdout)
    except (json.JSONDecodeError, UnicodeDecodeError):
        err = None
    if isinstance(err, dict) and ("msg" in err or "code" in err):
        code = err.get("code")
        msg = str(err.get("msg", "")).strip()
        details = str(err.get("details", "")).strip()
        text = f"{what} failed: {msg}" + (f": {details}" if details else "")
        if isinstance(code, int):
            text += f" (CNI error {code})"
        return PluginError(text, plugin=name, cni_code=code if isinstance(code, int) else None)
    output = _shown(stderr) or _shown(stdout) or "no output"
    return PluginError(f"{what} failed with exit status {status}: {output}", plugin=name)


async def supported_versions(plugin: Path, plugin_dirs: tuple[str, ...], timeout: float,
                             owner: str = "") -> list[str]:
    """The CNI versions a plugin says it supports (CNI_COMMAND=VERSION)."""
    out = await run(plugin, Invocation("VERSION", plugin_dirs=plugin_dirs, owner=owner),
                    json.dumps({"cniVersion": "1.0.0"}).encode(), timeout)
    versions = (out or {}).get("supportedVersions")
    if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
        raise PluginError(f"CNI plugin {plugin.name!r} VERSION gave no supportedVersions list", plugin=plugin.name)
    return versions
