"""The container's user: uid, gid and groups, resolved in the rootfs's /etc/passwd and /etc/group."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.runtimed.paths import read_file_in_root
from shared.errors import InvalidArgument


@dataclass
class User:
    uid: int
    gid: int
    additional_gids: list[int] = field(default_factory=list)
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


def resolve(rootfs: str, *, image_user: str = "", run_as_user: int | None = None,
            run_as_username: str = "", run_as_group: int | None = None,
            supplemental_groups: list[int] | None = None) -> User:
    """Apply the kubelet's rules: the security context wins over the image's USER."""
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
    extra: list[int] = []
    if name is not None:
        extra = [g for _gname, g, members in groups if name in members]
    for g in supplemental_groups or []:
        extra.append(int(g))
    seen = {gid}
    additional = []
    for g in extra:
        if g not in seen:
            seen.add(g)
            additional.append(g)
    return User(uid=uid, gid=gid, additional_gids=additional, home=home, name=name)
