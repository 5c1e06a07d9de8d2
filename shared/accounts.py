"""Finding, or creating when missing, the system users and groups of shared/identities.py.

What deploy/criopy.sysusers.conf makes under systemd, made by crio-py itself
when it starts as root (`criopy run`, `criopy service ...`), so that a fresh
machine needs nothing created by hand: a group per service, and the users of
the services that run unprivileged, as system accounts with no home and no
login shell. Debian's groupadd and useradd (the passwd package) do the work.

Called before any event loop runs, so the programs are run synchronously.
"""

from __future__ import annotations

import grp
import pwd
import shutil
import subprocess

import structlog

from shared.config import Config
from shared.errors import Internal
from shared.identities import group_of, identity
from shared.services import START_ORDER

log = structlog.get_logger(__name__)

# groupadd's and useradd's exit status for a name already taken (by a process racing us).
_NAME_IN_USE = 9
TIMEOUT = 30.0


def _exists(lookup, name: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        lookup(name)
        return True
    except KeyError:
        return False


def _run(args: list[str]) -> None:
    program = shutil.which(args[0]) or shutil.which(args[0], path="/usr/sbin:/sbin") or args[0]
    try:
        done = subprocess.run([program, *args[1:]], capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Internal(f"cannot run {args[0]} (Debian's passwd package): {e}") from None
    if done.returncode not in (0, _NAME_IN_USE):
        raise Internal(f"{' '.join(args)} failed with status {done.returncode}: {done.stderr.strip()}")


def ensure(config: Config) -> list[str]:
    """Create the groups and users the services run as that this machine lacks; the names created."""
    created: list[str] = []
    for service in START_ORDER:
        name = group_of(service)
        if not _exists(grp.getgrnam, name):
            _run(["groupadd", "--system", name])
            created.append(name)
    for service in START_ORDER:
        ident = identity(service, config)
        if ident.unprivileged and not _exists(pwd.getpwnam, ident.user):
            _run(["useradd", "--system", "--gid", ident.group, "--no-create-home", "--home-dir", "/",
                  "--shell", "/usr/sbin/nologin", "--comment", f"crio-py {service}", ident.user])
            created.append(ident.user)
    if created:
        log.info("accounts_created", names=created)
    return created
