"""The container's user: uid, gid and groups, resolved in the rootfs's /etc/passwd and /etc/group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.runtimed.paths import read_file_in_root
from shared.errors import InvalidArgument


@dataclass
class User:
    uid: int
    gid: int
    additional_gids: list[int] = field(default_factory=list)  # the primary gid first, as CRI-O
    home: str = "/"
    name: str | None = None


@dataclass
class _Passwd:
    name: str
    uid: int
    gid: int
    home: str


def _passwd(rootfs: str) -> list[_Passwd]:
    text = read_file_in_root(rootfs, "/etc/passwd") or ""
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or line.startswith("#"):
            continue
        try:
            entries.append(_Passwd(fields[0], int(fields[2]), int(fields[3]),
                                   fields[5] if len(fields) > 5 and fields[5] else "/"))
        except ValueError:
            continue
    return entries


def _groups(rootfs: str) -> list[tuple[str, int, list[str]]]:
    text = read_file_in_root(rootfs, "/etc/group") or ""
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 3 or line.startswith("#"):
            continue
        try:
            members = [m for m in fields[3].split(",") if m] if len(fields) > 3 else []
            entries.append((fields[0], int(fields[2]), members))
        except ValueError:
            continue
    return entries


def _id(text: str) -> int | None:
    if text.isdigit():
        value = int(text)
        if value > 0xFFFFFFFE:
            raise InvalidArgument(f"id out of range: {text}")
        return value
    return None


# CRI SupplementalGroupsPolicy, as MessageToDict spells it (absent: Merge, the zero value).
SUPPLEMENTAL_GROUPS_POLICIES = {None: "Merge", 0: "Merge", "Merge": "Merge", 1: "Strict", "Strict": "Strict"}


def check_run_as_group(sc: dict[str, Any], *, pod: bool = False) -> None:
    """The CRI's rule: a group to run as needs a user to run as (for a container, a user name will do)."""
    if sc.get("run_as_group") is None or sc.get("run_as_user") is not None or sc.get("run_as_username"):
        return
    if pod:
        raise InvalidArgument("pod sandbox linux.security_context.run_as_group is set without "
                              "linux.security_context.run_as_user")
    raise InvalidArgument("container linux.security_context.run_as_group is set without "
                          "linux.security_context.run_as_user or run_as_username")


def supplemental_groups_policy(value: object) -> str:
    """The policy's name from its CRI value; an unknown one is refused, not taken for Merge."""
    if value not in SUPPLEMENTAL_GROUPS_POLICIES:
        raise InvalidArgument(f"unknown supplemental_groups_policy {value!r}")
    return SUPPLEMENTAL_GROUPS_POLICIES[value]  # type: ignore[index]


def resolve(rootfs: str, *, image_user: str = "", run_as_user: int | None = None,
            run_as_username: str = "", run_as_group: int | None = None,
            supplemental_groups: list[int] | None = None, groups_policy: str = "Merge") -> User:
    """Apply the kubelet's rules: the security context wins over the image's USER.

    The groups are the primary one, then (policy Merge) the image's /etc/group
    memberships of the user, then the requested ones; Strict leaves out the image's.
    """
    image_user = image_user or ""
    user_part, _, group_part = image_user.partition(":")
    if run_as_user is not None:
        user_part, group_part = str(run_as_user), group_part
    elif run_as_username:
        user_part = run_as_username
    passwd = _passwd(rootfs)
    uid: int
    gid = 0
    name: str | None = None
    home = "/"
    numeric = _id(user_part) if user_part else 0
    if not user_part:
        numeric = 0
    if numeric is not None:
        uid = numeric
        for entry in passwd:
            if entry.uid == uid:
                gid, name, home = entry.gid, entry.name, entry.home
                break
    else:
        for entry in passwd:
            if entry.name == user_part:
                uid, gid, name, home = entry.uid, entry.gid, entry.name, entry.home
                break
        else:
            raise InvalidArgument(f"user {user_part!r} not found in the image's /etc/passwd")
    groups = _groups(rootfs)
    if group_part:
        numeric_gid = _id(group_part)
        if numeric_gid is not None:
            gid = numeric_gid
        else:
            for gname, g, _members in groups:
                if gname == group_part:
                    gid = g
                    break
            else:
                raise InvalidArgument(f"group {group_part!r} not found in the image's /etc/group")
    if run_as_group is not None:
        gid = run_as_group
    extra: list[int] = [gid]
    if name is not None and groups_policy == "Merge":
        extra += [g for _gname, g, members in groups if name in members]
    for g in supplemental_groups or []:
        extra.append(int(g))
    seen: set[int] = set()
    additional = []
    for g in extra:
        if g not in seen:
            seen.add(g)
            additional.append(g)
    return User(uid=uid, gid=gid, additional_gids=additional, home=home, name=name)
