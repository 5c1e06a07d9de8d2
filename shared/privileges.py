"""Linux capabilities and user ids: what a process holds, dropping all but a declared set, changing user.

Each service calls `restrict_to(...)` first thing at start, before any thread
exists (capability sets are per thread) and before it reads a request. Being
uid 0 then grants nothing more: a program it executes gets at most the bounding
set, which is the declared set.

A service that runs as a user of its own (shared/identities.py) and starts as
root then calls `switch_to(...)`. glibc makes every thread of the process
change its ids (setgroups, setresgid and setresuid are broadcast to all
threads), and the kernel clears each thread's permitted and effective
capabilities as its uid leaves 0; the bounding set was emptied before any
other thread existed, and no_new_privs keeps any exec from raising them again.
"""

from __future__ import annotations

import ctypes
import os
from typing import Iterable

from shared.libc import libc

CAPABILITY_NAMES: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
CAPABILITY_NUMBERS = {name: i for i, name in enumerate(CAPABILITY_NAMES)}

_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = libc()


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return len(CAPABILITY_NAMES) - 1


def names_from_mask(mask: int) -> frozenset[str]:
    return frozenset(
        CAPABILITY_NAMES[i] if i < len(CAPABILITY_NAMES) else f"CAP_{i}"
        for i in range(64) if mask >> i & 1
    )


def mask_from_names(names: Iterable[str]) -> int:
    mask = 0
    for name in names:
        full = name if name.startswith("CAP_") else f"CAP_{name}"
        if full not in CAPABILITY_NUMBERS:
            raise ValueError(f"unknown capability {name!r}")
        mask |= 1 << CAPABILITY_NUMBERS[full]
    return mask


def read_status_sets(pid: int | str = "self") -> dict[str, frozenset[str]]:
    """The capability sets of a process as /proc/PID/status shows them."""
    sets: dict[str, frozenset[str]] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                sets[key] = names_from_mask(int(value.strip(), 16))
    return sets


def effective_capabilities(pid: int | str = "self") -> frozenset[str]:
    return read_status_sets(pid)["CapEff"]


def bounding_capabilities(pid: int | str = "self") -> frozenset[str]:
    return read_status_sets(pid)["CapBnd"]


def restrict_to(keep: Iterable[str], *, bounding: Iterable[str] | None = None) -> frozenset[str]:
    """Drop every capability not in `keep` from all five sets of this thread.

    `bounding`, when given, is the bounding set instead of `keep`: a service
    that needs capabilities only until it changes user holds them in its
    permitted set alone, so that nothing it executes, nor any thread, gets
    them back. Capabilities already out of the bounding set are left alone,
    so a process that a launcher restricted already needs no CAP_SETPCAP.
    Returns the set actually kept (`keep` limited to what the process had).
    Must run before any other thread is started.
    """
    had_bounding = mask_from_names(bounding_capabilities())
    keep_mask = mask_from_names(keep) & mask_from_names(read_status_sets()["CapPrm"])
    bounding_mask = keep_mask if bounding is None else mask_from_names(bounding) & had_bounding
    if _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        if err != 22:  # EINVAL: kernel without ambient capabilities
            raise OSError(err, f"clearing ambient capabilities: {os.strerror(err)}")
    for cap in range(last_cap() + 1):
        if had_bounding >> cap & 1 and not bounding_mask >> cap & 1:
            if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                err = ctypes.get_errno()
                if err != 22:  # EINVAL: a capability this kernel does not know
                    raise OSError(err, f"dropping {CAPABILITY_NAMES[cap]} from the bounding set: {os.strerror(err)}")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for word in range(2):
        bits = keep_mask >> (32 * word) & 0xFFFFFFFF
        data[word].effective = bits
        data[word].permitted = bits
        data[word].inheritable = 0
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    return names_from_mask(keep_mask)


_PR_SET_NO_NEW_PRIVS = 38


def no_new_privileges() -> None:
    """No program this process (or a thread started later) executes gains a privilege (setuid bits, file caps)."""
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")


def needs_switch(uid: int, gid: int, groups: frozenset[int]) -> bool:
    """Whether this process's ids differ from these (real, effective and saved alike)."""
    return (set(os.getresuid()) != {uid} or set(os.getresgid()) != {gid}
            or set(os.getgroups()) - {gid} != set(groups))


def switch_to(uid: int, gid: int, groups: frozenset[int]) -> None:
    """Become `uid`, `gid` with exactly `groups` besides, in every thread; needs CAP_SETUID and CAP_SETGID.

    Leaving uid 0 clears the permitted and effective capabilities of every thread.
    """
    os.setgroups(sorted(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if needs_switch(uid, gid, groups):
        raise OSError(f"could not become uid {uid} gid {gid} groups {sorted(groups)}")


_CLONE_NEWNET = 0x40000000


def isolate_network() -> None:
    """Move this process into a new, empty network namespace (loopback down, no routes).

    The bus uses filesystem unix sockets, which work across network namespaces.
    Needs CAP_SYS_ADMIN, so it runs before the capabilities are dropped.
    """
    if _libc.unshare(_CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
