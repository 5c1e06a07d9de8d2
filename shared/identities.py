"""Who each of crio-py's processes runs as, and who a peer on one of its sockets is.

    frontend    user criopy-frontend, group criopy-frontend, and the groups of the
                four daemons (a daemon's socket directory is open to its group:
                the frontend is their one caller)
    imaged      user criopy-imaged, group criopy-imaged
    storaged    uid 0, gid 0, and group criopy-storaged
    netd        uid 0, gid 0, and group criopy-netd
    runtimed    uid 0, gid 0, and group criopy-runtimed
    root        uid 0 in none of those groups: the `criopy` command, the kubelet

A root daemon's own group owns nothing but its socket directory: it is how a
server tells a uid-0 peer that is a daemon from the administrator. No group
is shared by all services, and no daemon is in another daemon's group.

Users come from the configuration (`[criopy.users]`); groups are always
`criopy-<service>`. deploy/criopy.sysusers.conf makes the same accounts under
systemd; shared/accounts.py makes them when crio-py starts as root.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass
from typing import Any

from shared import privileges
from shared.bus.api import FRONTEND, ROOT
from shared.config import Config
from shared.errors import FailedPrecondition
from shared.services import DAEMONS, START_ORDER

ROOT_USER = "root"
# The daemons that keep uid 0; their own group tells them apart from root.
ROOT_DAEMONS: tuple[str, ...] = ("storaged", "netd", "runtimed")


class MissingAccount(FailedPrecondition):
    """A user or group of the table does not exist on this machine."""


def group_of(service: str) -> str:
    return f"criopy-{service}"


@dataclass(frozen=True)
class Identity:
    """A process's user, primary group and supplementary groups, by name."""

    user: str
    group: str
    groups: tuple[str, ...] = ()

    @property
    def unprivileged(self) -> bool:
        return self.user != ROOT_USER


def identity(service: str, config: Config) -> Identity:
    """The identity `service` runs as (the supervisor and anything unknown: plain root)."""
    users = config.criopy.users
    if service == "frontend" and users.frontend != ROOT_USER:
        return Identity(users.frontend, group_of("frontend"), tuple(group_of(d) for d in DAEMONS))
    if service == "imaged" and users.imaged != ROOT_USER:
        return Identity(users.imaged, group_of("imaged"))
    if service in ROOT_DAEMONS:
        return Identity(ROOT_USER, ROOT_USER, (group_of(service),))
    return Identity(ROOT_USER, ROOT_USER)


@dataclass(frozen=True)
class Credentials:
    """Numeric ids: a uid, a primary gid and the supplementary gids (the primary one left out)."""

    uid: int
    gid: int
    groups: frozenset[int]

    def describe(self) -> str:
        return f"uid {self.uid} gid {self.gid} groups {sorted(self.groups)}"


def user_id(name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise MissingAccount(f"user {name} does not exist") from None


def group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise MissingAccount(f"group {name} does not exist") from None


def resolve(ident: Identity) -> Credentials:
    gid = group_id(ident.group)
    return Credentials(user_id(ident.user), gid, frozenset(group_id(g) for g in ident.groups) - {gid})


def process_credentials(pid: int | str = "self") -> Credentials:
    """The effective uid and gid of a process, and its supplementary groups, from /proc/PID/status."""
    fields: dict[str, list[str]] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                fields[key] = value.split()
    gid = int(fields["Gid"][1])
    return Credentials(int(fields["Uid"][1]), gid, frozenset(int(g) for g in fields.get("Groups", [])) - {gid})


def _name(lookup, number: int) -> str:  # type: ignore[no-untyped-def]
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)


def describe_process(pid: int) -> dict[str, Any]:
    """What `criopy status` shows of a running process: its ids, their names, its capability sets."""
    creds = process_credentials(pid)
    sets = privileges.read_status_sets(pid)
    return {
        "uid": creds.uid, "gid": creds.gid, "groups": sorted(creds.groups),
        "user": _name(pwd.getpwuid, creds.uid), "group": _name(grp.getgrgid, creds.gid),
        "group_names": [_name(grp.getgrgid, g) for g in sorted(creds.groups)],
        "capabilities": sorted(sets["CapEff"]),
        "capability_sets": {key: sorted(value) for key, value in sets.items()},
    }


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a unix socket, as the kernel recorded it at connect()."""

    uid: int
    gid: int
    pid: int
    # Read from /proc when the connection is checked; None when the process is already gone.
    groups: frozenset[int] | None

    @classmethod
    def of(cls, uid: int, gid: int, pid: int) -> "Peer":
        try:
            groups: frozenset[int] | None = process_credentials(pid).groups
        except (OSError, KeyError, ValueError, IndexError):
            groups = None
        return cls(uid, gid, pid, groups)

    def describe(self) -> str:
        return f"uid {self.uid} gid {self.gid} pid {self.pid}"


class Callers:
    """Which of crio-py's processes (or root) a peer is, for one configuration.

    A peer is a service when it has that service's uid and holds its group;
    it is root when it has uid 0 and is none of the services. Accounts that
    do not exist on this machine match nobody.
    """

    def __init__(self, config: Config) -> None:
        self._services: list[tuple[str, int, int]] = []
        for service in START_ORDER:
            ident = identity(service, config)
            own = group_of(service)
            if own != ident.group and own not in ident.groups:
                continue  # kept root by the configuration: it is root
            try:
                self._services.append((service, user_id(ident.user), group_id(own)))
            except MissingAccount:
                continue
        self._root_is_frontend = config.criopy.users.frontend == ROOT_USER

    def roles(self, peer: Peer) -> frozenset[str]:
        """The names the peer answers to: services, ROOT, or nothing at all."""
        if peer.groups is None:
            return frozenset()
        held = peer.groups | {peer.gid}
        roles = {name for name, uid, gid in self._services if peer.uid == uid and gid in held}
        if peer.uid == 0 and not roles:
            roles.add(ROOT)
            if self._root_is_frontend:
                roles.add(FRONTEND)
        return frozenset(roles)


def describe_roles(roles: frozenset[str]) -> str:
    """A caller's name for logs and metrics."""
    return "+".join(sorted(roles)) or "unknown"
