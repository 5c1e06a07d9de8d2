"""A container's bind mounts and devices in its spec, from the CRI request; recursive read-only rules."""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from services.runtimed.paths import clean_absolute
from shared.errors import InvalidArgument
from shared.mountinfo import mount_of

# A mount's CRI propagation and the OCI option that gives it.
PROPAGATION = {
    None: "rprivate", "PROPAGATION_PRIVATE": "rprivate", 0: "rprivate",
    "PROPAGATION_HOST_TO_CONTAINER": "rslave", 1: "rslave",
    "PROPAGATION_BIDIRECTIONAL": "rshared", 2: "rshared",
}


def check_recursive_read_only(i: int, m: dict[str, Any], rro: bool, rro_reason: str) -> None:
    """The CRI's rules for a recursive read-only mount: read-only, private, and a runtime that can."""
    if not m.get("recursive_read_only"):
        return
    what = f"mounts[{i}] ({m.get('host_path', '')})"
    if not m.get("readonly"):
        raise InvalidArgument(f"{what}: recursive_read_only needs readonly")
    if PROPAGATION.get(m.get("propagation"), "") != "rprivate":
        raise InvalidArgument(f"{what}: recursive_read_only needs propagation PROPAGATION_PRIVATE, "
                              f"not {m.get('propagation')}")
    if not rro:
        raise InvalidArgument(f"{what}: recursive read-only mounts are not supported by the runtime handler: "
                              f"{rro_reason}")


def user_mounts(config: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, list[dict[str, Any]]]:
    """Bind mounts from CRI mounts; the rootfs propagation they need; their status records.

    The recursive read-only rules were applied by check_request.
    """
    out: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    rootfs_propagation: str | None = None
    for i, m in enumerate(config.get("mounts") or []):
        dest = clean_absolute(m.get("container_path", ""), f"mounts[{i}].container_path")
        host = m.get("host_path", "")
        if not host or not host.startswith("/"):
            raise InvalidArgument(f"mounts[{i}].host_path must be an absolute path: {host!r}")
        if not os.path.exists(host):
            raise InvalidArgument(f"mounts[{i}]: host path {host} does not exist")
        source = os.path.realpath(host)
        propagation = PROPAGATION.get(m.get("propagation"))
        if propagation is None:
            raise InvalidArgument(f"mounts[{i}]: unknown propagation {m.get('propagation')!r}")
        if propagation != "rprivate":
            info = mount_of(source)
            if propagation == "rshared" and not (info and info.shared):
                raise InvalidArgument(f"mounts[{i}]: {host} is not on a shared mount, needed for bidirectional propagation")
            if propagation == "rslave" and not (info and (info.shared or info.slave)):
                raise InvalidArgument(f"mounts[{i}]: {host} is not on a shared or slave mount, needed for host-to-container propagation")
            if propagation == "rshared" or rootfs_propagation is None:
                rootfs_propagation = "rshared" if propagation == "rshared" else "rslave"
        readonly = bool(m.get("readonly"))
        recursive = bool(m.get("recursive_read_only"))
        # As CRI-O: runc's `rro` makes the whole tree read-only, submounts included; `ro` only the top.
        options = ["rbind", propagation] + (["rro"] if recursive else ["ro"] if readonly else [])
        out.append({"destination": dest, "type": "bind", "source": source, "options": options})
        records.append({"container_path": dest, "host_path": host, "readonly": readonly,
                        "recursive_read_only": recursive,
                        "propagation": m.get("propagation") or "PROPAGATION_PRIVATE"})
    return out, rootfs_propagation, records


def _device_entries(host: str, container: str, permissions: str) -> list[tuple[dict, dict]]:
    st = os.stat(host)
    if stat.S_ISDIR(st.st_mode):
        entries = []
        for root, _dirs, files in os.walk(host):
            for name in files:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, host)
                try:
                    entries += _device_entries(path, os.path.join(container, rel), permissions)
                except InvalidArgument:
                    continue
        return entries
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        raise InvalidArgument(f"{host} is not a device")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    node = {"path": container, "type": kind, "major": major, "minor": minor,
            "fileMode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
    rule = {"allow": True, "type": kind, "major": major, "minor": minor, "access": permissions}
    return [(node, rule)]


def devices(config: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    nodes, rules = [], []
    for i, d in enumerate(config.get("devices") or []):
        host = d.get("host_path", "")
        container = clean_absolute(d.get("container_path") or host, f"devices[{i}].container_path")
        permissions = d.get("permissions") or "rwm"
        if not re.fullmatch(r"[rwm]{1,3}", permissions):
            raise InvalidArgument(f"devices[{i}].permissions must be made of r, w and m: {permissions!r}")
        if not host.startswith("/") or not os.path.exists(host):
            raise InvalidArgument(f"devices[{i}]: host device {host!r} does not exist")
        for node, rule in _device_entries(host, container, permissions):
            nodes.append(node)
            rules.append(rule)
    return nodes, rules


def host_devices() -> list[dict]:
    """Every device node of the host, for privileged containers."""
    nodes = []
    for root, dirs, files in os.walk("/dev"):
        dirs[:] = [d for d in dirs if d not in ("pts", "shm", "mqueue")]
        for name in files:
            path = os.path.join(root, name)
            try:
                for node, _rule in _device_entries(path, path, "rwm"):
                    if path in ("/dev/console", "/dev/ptmx", "/dev/tty") or path.startswith("/dev/tty"):
                        continue
                    nodes.append(node)
            except (OSError, InvalidArgument):
                continue
    return nodes
