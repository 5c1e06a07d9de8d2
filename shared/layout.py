"""The directories each process owns, with their owner, group and mode.

    <bus dir>/                    root:root 0755
    <bus dir>/<daemon>/           <daemon's user>:criopy-<daemon> 0750   its bus, events and
                                  streams sockets (0660) and its lock: only the daemon and the
                                  frontend, member of the daemon's group, may enter
    <bus dir>/supervisor/         root:root 0700   the supervisor's socket and lock
    <root>/imaged/                criopy-imaged:criopy-imaged 0700   imaged's state

Made when a process starts as root (`criopy run`, `criopy service NAME`), each
by the process it belongs to; under systemd, deploy/criopy.tmpfiles.conf and
the units' StateDirectory= make the same, and no unit declares a directory
that holds another service's files. Root daemons make their state
directories themselves, as root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shared.bus import ipc
from shared.config import Config
from shared.identities import group_id, group_of, identity, user_id
from shared.services import DAEMONS


@dataclass(frozen=True)
class Directory:
    path: Path
    user: str
    group: str
    mode: int
    # Whether files below are given the owner too (a directory a root-run predecessor filled).
    recursive: bool = False


def directories(service: str, config: Config) -> list[Directory]:
    """What `service` owns and must find in place before it changes user."""
    if service == "supervisor":
        return [Directory(config.service_bus_dir(service), "root", "root", ipc.PRIVATE_DIR_MODE)]
    ident = identity(service, config)
    found = []
    if service in DAEMONS:
        found.append(Directory(config.service_bus_dir(service), ident.user, group_of(service), ipc.DAEMON_DIR_MODE))
    if ident.unprivileged and service != "frontend":
        found.append(Directory(config.state_dir(service), ident.user, ident.group, ipc.PRIVATE_DIR_MODE,
                               recursive=True))
    return found


def _chown_below(path: Path, uid: int, gid: int) -> None:
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(top, name), uid, gid, follow_symlinks=False)


def prepare(service: str, config: Config) -> None:
    """Make `service`'s directories as the table says (run as root)."""
    if service == "frontend":
        # The CRI socket's directory; an existing one is the administrator's and kept as it is.
        os.makedirs(os.path.dirname(config.crio.api.listen), mode=0o755, exist_ok=True)
    for d in directories(service, config):
        uid, gid = user_id(d.user), group_id(d.group)
        was = (d.path.stat().st_uid, d.path.stat().st_gid) if d.path.exists() else None
        ipc.ensure_dir(d.path, mode=d.mode, owner=(uid, gid))
        if d.recursive and was is not None and was != (uid, gid):
            _chown_below(d.path, uid, gid)
