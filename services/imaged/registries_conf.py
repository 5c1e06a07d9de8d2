"""registries.conf (containers-registries.conf v2 TOML): search registries, endpoints, mirrors.

Only the v2 format is read: `unqualified-search-registries`, and
`[[registry]]` tables with `prefix`, `location`, `insecure`, `blocked` and
`[[registry.mirror]]` (`location`, `insecure`, `pull-from-mirror`).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from services.imaged.reference import DOCKER_HUB, Reference
from shared.errors import InvalidArgument

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """One place to pull a repository from: a host and the repository's path there."""

    host: str  # e.g. "127.0.0.1:5000"
    path: str  # repository path on that host
    insecure: bool  # plain HTTP
    mirror: bool = False

    @property
    def base_url(self) -> str:
        scheme = "http" if self.insecure else "https"
        host = "registry-1.docker.io" if self.host == DOCKER_HUB else self.host
        return f"{scheme}://{host}"


@dataclass(frozen=True)
class Mirror:
    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"  # all, digest-only, tag-only


@dataclass(frozen=True)
class RegistryEntry:
    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirrors: tuple[Mirror, ...] = ()


@dataclass
class RegistriesConf:
    unqualified_search_registries: list[str] = field(default_factory=list)
    registries: list[RegistryEntry] = field(default_factory=list)
    insecure_hosts: frozenset[str] = frozenset()

    def find(self, name: str) -> RegistryEntry | None:
        """The entry whose prefix matches `name` (domain/path) the longest."""
        best: RegistryEntry | None = None
        best_len = -1
        for entry in self.registries:
            if _prefix_matches(entry.prefix, name) and len(entry.prefix) > best_len:
                best, best_len = entry, len(entry.prefix)
        return best

    def endpoints(self, ref: Reference) -> tuple[RegistryEntry | None, list[Endpoint]]:
        """Where to pull `ref` from, mirrors first; the entry tells whether it is blocked."""
        name = ref.name
        entry = self.find(name)
        if entry is None:
            return None, [Endpoint(ref.domain, ref.path, ref.domain in self.insecure_hosts)]
        out: list[Endpoint] = []
        for m in entry.mirrors:
            if m.pull_from_mirror == "digest-only" and not ref.digest:
                continue
            if m.pull_from_mirror == "tag-only" and ref.digest:
                continue
            out.append(_rewrite(entry.prefix, m.location, name, m.insecure, mirror=True, hosts=self.insecure_hosts))
        out.append(_rewrite(entry.prefix, entry.location, name, entry.insecure, mirror=False, hosts=self.insecure_hosts))
        return entry, out


def _prefix_matches(prefix: str, name: str) -> bool:
    if prefix.startswith("*."):
        host = name.split("/", 1)[0]
        return host.endswith(prefix[1:])
    if not name.startswith(prefix):
        return False
    return len(name) == len(prefix) or name[len(prefix)] in "/:@"


def _rewrite(prefix: str, location: str, name: str, insecure: bool, *, mirror: bool,
             hosts: frozenset[str]) -> Endpoint:
    if prefix.startswith("*."):
        rewritten = name  # a wildcard entry cannot relocate
    else:
        rewritten = location + name[len(prefix):]
    host, _, path = rewritten.partition("/")
    if host == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return Endpoint(host, path, insecure or host in hosts, mirror)


def _check_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: must be a string")
    return value


def parse(text: str, *, source: str = "registries.conf",
          insecure_registries: list[str] | None = None) -> RegistriesConf:
    """Parse the TOML text of a registries.conf."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"{source}: not valid TOML: {e}") from None
    if "registries" in data and isinstance(data["registries"], dict):
        raise InvalidArgument(f"{source}: the v1 format ([registries.search]) is not supported; use v2")
    search = data.get("unqualified-search-registries", [])
    if not isinstance(search, list):
        raise InvalidArgument(f"{source}: unqualified-search-registries must be a list")
    search = [_check_str(s, f"{source}: unqualified-search-registries") for s in search]
    entries: list[RegistryEntry] = []
    for i, raw in enumerate(data.get("registry", [])):
        where = f"{source}: registry[{i}]"
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{where}: must be a table")
        location = _check_str(raw.get("location", ""), f"{where}.location").rstrip("/")
        prefix = _check_str(raw.get("prefix", "") or location, f"{where}.prefix").rstrip("/")
        if not prefix:
            raise InvalidArgument(f"{where}: needs a prefix or a location")
        if prefix.startswith("*.") and location:
            raise InvalidArgument(f"{where}: a wildcard prefix cannot have a location")
        mirrors = []
        for j, m in enumerate(raw.get("mirror", [])):
            if not isinstance(m, dict) or not m.get("location"):
                raise InvalidArgument(f"{where}.mirror[{j}]: needs a location")
            pfm = m.get("pull-from-mirror", "all") or "all"
            if pfm not in ("all", "digest-only", "tag-only"):
                raise InvalidArgument(f"{where}.mirror[{j}].pull-from-mirror: must be all, digest-only or tag-only")
            mirrors.append(Mirror(_check_str(m["location"], f"{where}.mirror[{j}].location").rstrip("/"),
                                  bool(m.get("insecure", False)), pfm))
        entries.append(RegistryEntry(prefix, location or prefix, bool(raw.get("insecure", False)),
                                     bool(raw.get("blocked", False)), tuple(mirrors)))
    return RegistriesConf(search, entries, frozenset(insecure_registries or ()))


class RegistriesConfFile:
    """The configured file, re-read when it changes (a missing file is an empty config)."""

    def __init__(self, path: str, insecure_registries: list[str]) -> None:
        self.path = Path(path) if path else None
        self.insecure = list(insecure_registries)
        self._stamp: tuple[int, int] | None = None
        self._conf = RegistriesConf(insecure_hosts=frozenset(self.insecure))

    def get(self) -> RegistriesConf:
        if self.path is None:
            return self._conf
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp is not None:
                self._stamp = None
                self._conf = RegistriesConf(insecure_hosts=frozenset(self.insecure))
            return self._conf
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._conf = parse(self.path.read_text(), source=str(self.path), insecure_registries=self.insecure)
            self._stamp = stamp
            log.info("registries_conf_loaded", path=str(self.path),
                     search=self._conf.unqualified_search_registries, registries=len(self._conf.registries))
        return self._conf
