"""ADD, DEL and CHECK of a whole network configuration list (what libcni does).

ADD runs the plugins in order, each receiving the previous one's result as
`prevResult`; DEL runs them in reverse order and CHECK in order, both with the
cached ADD result (from spec 0.4.0 on). Each plugin's configuration gets the
list's `name` and `cniVersion`, and a `runtimeConfig` holding only the
capability arguments (port mappings, bandwidth...) that the plugin asks for
in its `capabilities`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from services.netd import cni_plugin
from services.netd.cni_config import NetworkList, find_plugin, version_tuple
from services.netd.cni_plugin import Invocation, PluginError
from shared.errors import CriopyError, FailedPrecondition

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RuntimeConf:
    container_id: str
    netns: str
    ifname: str
    args: tuple[tuple[str, str], ...] = ()
    capability_args: dict[str, Any] = field(default_factory=dict)

    def cni_args(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.args)


class AddFailed(Exception):
    """ADD stopped at one plugin; `error` says why, `result` is the last good result."""

    def __init__(self, error: CriopyError, result: dict[str, Any] | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.result = result


class CniRunner:
    def __init__(self, plugin_dirs: list[str], timeout: float, owner: str = "") -> None:
        self.plugin_dirs = tuple(plugin_dirs)
        self.timeout = timeout
        self.owner = owner
        # Asked once per plugin binary: the pods of a burst that need it wait for the same answer.
        self._versions: dict[tuple[str, int], asyncio.Future[list[str]]] = {}

    def _plugin(self, plugin_type: str) -> Path:
        path = find_plugin(plugin_type, list(self.plugin_dirs))
        if path is None:
            raise PluginError(f"CNI plugin {plugin_type!r} not found in {', '.join(self.plugin_dirs)}",
                              plugin=plugin_type)
        return path

    def _invocation(self, command: str, rt: RuntimeConf) -> Invocation:
        return Invocation(command, container_id=rt.container_id, netns=rt.netns, ifname=rt.ifname,
                          args=rt.cni_args(), plugin_dirs=self.plugin_dirs, owner=self.owner)

    @staticmethod
    def plugin_config(net: NetworkList, plugin: dict[str, Any], prev_result: dict[str, Any] | None,
                      rt: RuntimeConf) -> dict[str, Any]:
        conf = copy.deepcopy(plugin)
        conf["name"] = net.name
        conf["cniVersion"] = net.cni_version
        if prev_result is not None:
            conf["prevResult"] = prev_result
        wanted = {k for k, on in (plugin.get("capabilities") or {}).items() if on is True}
        runtime = {k: v for k, v in rt.capability_args.items() if k in wanted}
        if runtime:
            conf["runtimeConfig"] = {**(conf.get("runtimeConfig") or {}), **runtime}
        return conf

    async def _call(self, command: str, net: NetworkList, plugin: dict[str, Any],
                    prev_result: dict[str, Any] | None, rt: RuntimeConf) -> dict[str, Any] | None:
        path = self._plugin(plugin["type"])
        stdin = json.dumps(self.plugin_config(net, plugin, prev_result, rt)).encode()
        return await cni_plugin.run(path, self._invocation(command, rt), stdin, self.timeout)

    async def check_versions(self, net: NetworkList) -> None:
        """Fail early, naming the plugin, if one does not speak the list's cniVersion."""
        for plugin in net.plugins:
            path = self._plugin(plugin["type"])
            try:
                key = (str(path), os.stat(path).st_mtime_ns)
            except OSError:
                key = (str(path), 0)
            asked = self._versions.get(key)
            if asked is None:
                asked = self._versions[key] = asyncio.ensure_future(cni_plugin.supported_versions(
                    path, self.plugin_dirs, self.timeout, self.owner))
                asked.add_done_callback(lambda done, key=key: self._forget_failed(key, done))
            supported = await asyncio.shield(asked)
            if net.cni_version not in supported:
                raise PluginError(
                    f"CNI plugin {plugin['type']!r} does not support cniVersion {net.cni_version} of network "
                    f"{net.name!r} (it supports {', '.join(supported)})", plugin=plugin["type"])

    def _forget_failed(self, key: tuple[str, int], done: asyncio.Future[list[str]]) -> None:
        """A failed answer is not kept: the next attach asks again."""
        if done.cancelled() or done.exception() is not None:
            self._versions.pop(key, None)

    async def add(self, net: NetworkList, rt: RuntimeConf) -> dict[str, Any]:
        """Run ADD through the chain; raises AddFailed naming the plugin that failed."""
        result: dict[str, Any] | None = None
        for plugin in net.plugins:
            try:
                out = await self._call("ADD", net, plugin, result, rt)
            except CriopyError as e:
                raise AddFailed(e, result) from None
            assert out is not None  # cni_plugin.run requires output for ADD
            result = out
        assert result is not None
        return result

    async def delete(self, net: NetworkList, rt: RuntimeConf, cached: dict[str, Any] | None) -> None:
        """Run DEL through the chain in reverse order.

        Every plugin is called even when an earlier one failed, so that each
        frees what it can; the first error is raised at the end. A failed DEL
        is tried a second time: DEL is idempotent, and a plugin that failed
        half-way (bridge 1.1.1 with iptables-nft fails on the masquerade
        chain of an interrupted ADD after removing the link) finishes then.
        """
        prev = cached if version_tuple(net.cni_version) >= (0, 4, 0) else None
        first_error: CriopyError | None = None
        for plugin in reversed(net.plugins):
            for attempt in (1, 2):
                try:
                    await self._call("DEL", net, plugin, prev, rt)
                    break
                except CriopyError as e:
                    log.warning("cni_del_failed", plugin=plugin["type"], container_id=rt.container_id,
                                attempt=attempt, error=e.message)
                    if attempt == 2 or isinstance(e, cni_plugin.PluginTimeout):
                        first_error = first_error or e
                        break
        if first_error is not None:
            raise first_error

    async def check(self, net: NetworkList, rt: RuntimeConf, cached: dict[str, Any]) -> None:
        if version_tuple(net.cni_version) < (0, 4, 0):
            raise FailedPrecondition(f"network {net.name!r} uses cniVersion {net.cni_version}, which has no CHECK")
        if net.disable_check:
            return
        for plugin in net.plugins:
            await self._call("CHECK", net, plugin, cached, rt)
