"""A pod's pinned IPC and UTS namespaces, and its sysctls, set by small programs that are already there.

util-linux's `unshare --ipc=FILE --uts=FILE` makes the namespaces and bind
mounts them onto the pin files (as netd pins network namespaces), then runs
/bin/sh inside them to write the hostname and the pod's IPC sysctls under
/proc/sys; net.* sysctls are written the same way inside the pod's network
namespace, entered with `nsenter`. The daemon itself never enters a
namespace, and a few milliseconds of C and dash replace a Python child's
tens.
"""

from __future__ import annotations

import os

import structlog

from shared import programs
from shared.errors import Internal, InvalidArgument
from shared.mounts import unmount

log = structlog.get_logger(__name__)

UNSHARE = "/usr/bin/unshare"
NSENTER = "/usr/bin/nsenter"
SH = "/bin/sh"
# Writes each pair of arguments (a file under /proc/sys, its value); on a failure it names
# the file on stderr's last line and exits with _WRITE_FAILED.
_WRITE_FAILED = 3
_WRITE = ('while [ $# -gt 0 ]; do printf %s "$2" > "/proc/sys/$1" '
          '|| { printf "\\n%s\\n" "$1" >&2; exit 3; }; shift 2; done')
_HOSTNAME = "kernel/hostname"

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
              sysctls: dict[str, str], timeout: float = 30.0) -> None:
    """Make new namespaces pinned onto `ipc_path` / `uts_path` (files created here), with the
    hostname and the pod's IPC sysctls set in them. net.* sysctls wait for `set_net_sysctls`."""
    flags = []
    for option, path in (("--ipc", ipc_path), ("--uts", uts_path)):
        if path:
            with open(path, "a"):
                pass
            flags.append(f"{option}={path}")
    if not flags:
        return
    writes: list[tuple[str, str]] = []
    if uts_path and hostname:
        writes.append((_HOSTNAME, hostname))
    if ipc_path:
        writes += [(_proc_name(k), v) for k, v in sysctls.items() if sysctl_namespace(k) == "ipc"]
    await _write([UNSHARE, *flags], writes, "pinning the pod's namespaces", timeout)


async def set_net_sysctls(netns: str | None, sysctls: dict[str, str], timeout: float = 30.0) -> None:
    """Write the pod's net.* sysctls inside its network namespace."""
    writes = [(_proc_name(k), v) for k, v in sysctls.items() if sysctl_namespace(k) == "net"]
    if writes and netns:
        await _write([NSENTER, f"--net={netns}"], writes, "entering the pod's network namespace", timeout)


def _proc_name(key: str) -> str:
    return key.replace(".", "/")


async def _write(enter: list[str], writes: list[tuple[str, str]], what: str, timeout: float) -> None:
    """Run the shell that writes `writes` under /proc/sys, in the namespaces `enter` gives it."""
    args = [*enter, SH, "-c", _WRITE, "criopy-sysctl", *(x for pair in writes for x in pair)]
    result = await programs.run(args, timeout=timeout, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if result.returncode == 0:
        return
    text = result.stderr.decode(errors="replace").strip()
    lines = text.splitlines()
    if result.returncode == _WRITE_FAILED and lines:
        failed = lines[-1]
        reason = " ".join(lines[:-1]).strip() or "write failed"
        values = dict(writes)
        if failed == _HOSTNAME:
            raise Internal(f"setting the pod's hostname {values.get(failed)!r}: {reason}")
        raise InvalidArgument(f"pod sysctls: sysctl {failed.replace('/', '.')}={values.get(failed)}: {reason}")
    raise Internal(f"{what}: {text or f'exit status {result.returncode}'}")


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
