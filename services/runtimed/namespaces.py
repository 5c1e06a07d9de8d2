"""A pod's pinned IPC and UTS namespaces: made by a child process, kept as bind mounts."""

from __future__ import annotations

import json
import os
import sys

import structlog

from shared import programs
from shared.errors import Internal, InvalidArgument
from shared.mounts import unmount

log = structlog.get_logger(__name__)

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pin_child.py")
# util-linux's unshare makes and pins namespaces itself, then runs the program given inside them.
UNSHARE = "/usr/bin/unshare"
HOSTNAME = "/usr/bin/hostname"
TRUE = "/usr/bin/true"

_IPC_SYSCTLS = ("kernel.shmmax", "kernel.shmall", "kernel.shmmni", "kernel.shm_rmid_forced",
                "kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem")


def sysctl_namespace(key: str) -> str | None:
    """Which pod namespace a sysctl belongs to ('ipc', 'net'), or None if it is not namespaced."""
    if key in _IPC_SYSCTLS or key.startswith("fs.mqueue."):
        return "ipc"
    if key.startswith("net."):
        return "net"
    return None


def check_sysctls(sysctls: dict[str, str], *, host_ipc: bool, host_network: bool) -> dict[str, str]:
    out = {}
    for key, value in sysctls.items():
        key = key.replace("/", ".")
        kind = sysctl_namespace(key)
        if kind is None:
            raise InvalidArgument(f"sysctl {key} is not namespaced and may not be set for a pod")
        if kind == "ipc" and host_ipc:
            raise InvalidArgument(f"sysctl {key} cannot be set in a pod using the host's IPC namespace")
        if kind == "net" and host_network:
            raise InvalidArgument(f"sysctl {key} cannot be set in a pod using the host's network")
        if any(p in ("", "..") for p in key.split(".")) or "\n" in str(value):
            raise InvalidArgument(f"invalid sysctl {key}={value!r}")
        out[key] = str(value)
    return out


async def pin(*, ipc_path: str | None, uts_path: str | None, hostname: str,
              sysctls: dict[str, str], netns: str | None, timeout: float = 30.0) -> None:
    """Make the namespaces and pin them onto `ipc_path` / `uts_path` (files created here)."""
    for path in (ipc_path, uts_path):
        if path:
            with open(path, "a"):
                pass
    if not (ipc_path or uts_path or sysctls):
        return
    if sysctls:
        request = {"ipc": ipc_path, "uts": uts_path, "hostname": hostname, "sysctls": sysctls, "netns": netns}
        args = [sys.executable, "-I", _CHILD, json.dumps(request)]
    else:
        # Most pods: two small C programs, a few milliseconds of CPU where a Python child takes
        # thirty, on the CPU that all the pods of a burst (a node restart) share.
        program = [HOSTNAME, hostname] if uts_path and hostname else [TRUE]
        args = [UNSHARE, *(f"--{kind}={path}" for kind, path in (("ipc", ipc_path), ("uts", uts_path)) if path),
                "--", *program]
    result = await programs.run(args, timeout=timeout)
    if result.returncode != 0:
        text = result.stderr.decode(errors="replace").strip()
        if text.startswith("sysctl"):
            raise InvalidArgument(f"pod sysctls: {text}")
        raise Internal(f"pinning the pod's namespaces: {text or result.returncode}")


def unpin(path: str | None) -> None:
    """Unmount a pinned namespace file and remove it; missing is fine."""
    if not path:
        return
    try:
        unmount(path)
    except OSError as e:
        log.warning("namespace_unmount_failed", path=path, error=str(e))
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
