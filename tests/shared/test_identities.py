"""Identities: the accounts, who a peer is, one instance per lock, sockets never taken over."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shared import accounts, instance_lock
from shared.bus import ipc
from shared.bus.api import FRONTEND, ROOT
from shared.config import Config
from shared.identities import Callers, Peer, group_of, identity, resolve
from shared.services import START_ORDER
from tests.support.stack import root_as_frontend

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def config() -> Config:
    config = Config()
    accounts.ensure(config)
    return config


def test_the_accounts_exist_once_made_and_making_them_again_changes_nothing(config: Config) -> None:
    assert accounts.ensure(config) == []
    for name in START_ORDER:
        grp.getgrnam(group_of(name))
    frontend = pwd.getpwnam("criopy-frontend")
    assert frontend.pw_gid == grp.getgrnam("criopy-frontend").gr_gid
    assert frontend.pw_shell == "/usr/sbin/nologin" and pwd.getpwnam("criopy-imaged").pw_uid != 0


def test_a_missing_user_is_made_with_its_services_group() -> None:
    config = Config()
    config.criopy.users.imaged = f"cpt-{os.getpid()}"
    try:
        assert accounts.ensure(config) == [config.criopy.users.imaged]
        made = pwd.getpwnam(config.criopy.users.imaged)
        assert made.pw_gid == grp.getgrnam("criopy-imaged").gr_gid and made.pw_uid < 1000
        assert resolve(identity("imaged", config)).uid == made.pw_uid
    finally:
        subprocess.run(["userdel", config.criopy.users.imaged], capture_output=True)


def test_no_group_is_shared_by_two_daemons_and_only_the_frontend_joins_theirs(config: Config) -> None:
    daemons = ("storaged", "imaged", "netd", "runtimed")
    held = {name: {identity(name, config).group, *identity(name, config).groups} for name in START_ORDER}
    for name in daemons:
        for other in daemons:
            if name != other:
                assert not held[name] & held[other] - {"root"}, (name, other)
        assert group_of(name) in held["frontend"]
    assert not set.intersection(*held.values())


def peer(service: str, config: Config) -> Peer:
    creds = resolve(identity(service, config))
    return Peer(creds.uid, creds.gid, 1, creds.groups)


def test_a_peer_is_named_by_its_uid_and_its_groups(config: Config) -> None:
    callers = Callers(config)
    for name in START_ORDER:
        assert callers.roles(peer(name, config)) == {name}, name
    assert callers.roles(Peer(0, 0, 1, frozenset())) == {ROOT}
    # uid 0 holding a root daemon's group is that daemon, not root.
    assert callers.roles(Peer(0, 0, 1, frozenset({grp.getgrnam("criopy-netd").gr_gid}))) == {"netd"}
    # The frontend's uid without its group is nobody; a peer whose groups could not be read is nobody.
    frontend = pwd.getpwnam("criopy-frontend")
    assert callers.roles(Peer(frontend.pw_uid, 65534, 1, frozenset())) == frozenset()
    assert callers.roles(Peer(0, 0, 1, None)) == frozenset()
    assert callers.roles(Peer(65534, 65534, 1, frozenset())) == frozenset()


def test_root_counts_as_the_frontend_only_when_configured(config: Config) -> None:
    by_hand = Callers(root_as_frontend())
    assert by_hand.roles(Peer(0, 0, 1, frozenset())) == {ROOT, FRONTEND}
    assert by_hand.roles(peer("runtimed", config)) == {"runtimed"}


def test_a_second_holder_of_a_lock_is_told_the_first_ones_pid(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    assert instance_lock.holder(path) is None
    fd = instance_lock.acquire(path, "criopy service testd")
    try:
        assert instance_lock.holder(path) == os.getpid()
        code = ("import sys; from pathlib import Path; from shared import instance_lock\n"
                "try:\n    instance_lock.acquire(Path(sys.argv[1]), 'criopy service testd')\n"
                "except instance_lock.AlreadyRunning as e:\n    print(e.message)\n")
        other = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30,
                               cwd=Path(__file__).resolve().parents[2])
        assert other.stdout.strip() == f"criopy service testd is already running (pid {os.getpid()}, holding {path})"
    finally:
        os.close(fd)
    assert instance_lock.holder(path) is None


def test_a_stale_socket_file_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    live, stale = tmp_path / "live.sock", tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as dead:
        server.bind(str(live))
        server.listen()
        dead.bind(str(stale))  # bound, never listening: what a killed process leaves
        with pytest.raises(ipc.SocketInUse):
            ipc.claim(live)
        ipc.claim(stale)
    assert live.exists() and not stale.exists()
