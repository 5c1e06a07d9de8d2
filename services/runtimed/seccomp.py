"""Seccomp profiles: the built-in RuntimeDefault profile and Localhost profiles from files.

The default profile allows what ordinary programs use and refuses, with
EPERM, the system calls that reach into the kernel's global state (modules,
kexec, keyrings, swap, clock, BPF, perf) always, and the namespace and mount
calls unless the container holds the capability they need, as Docker's and
CRI-O's default profiles do.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from shared.errors import InvalidArgument

EPERM = 1
ENOSYS = 38

_ALWAYS_BLOCKED = [
    "acct", "add_key", "request_key", "keyctl", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "create_module", "get_kernel_syms",
    "query_module", "lookup_dcookie", "nfsservctl", "quotactl", "quotactl_fd", "swapon", "swapoff",
    "sysfs", "_sysctl", "uselib", "userfaultfd", "ustat", "vm86", "vm86old",
    "io_pgetevents", "kcmp", "afs_syscall", "tuxcall", "security", "vserver", "putpmsg", "getpmsg",
]

# System calls a capability unlocks.
_BY_CAPABILITY = {
    "CAP_SYS_ADMIN": [
        "mount", "umount", "umount2", "unshare", "setns", "pivot_root", "name_to_handle_at",
        "fsopen", "fsconfig", "fsmount", "fspick", "open_tree", "move_mount", "mount_setattr",
        "bpf", "fanotify_init", "lookup_dcookie", "perf_event_open", "quotactl", "setdomainname",
        "sethostname", "syslog",
    ],
    "CAP_SYS_BOOT": ["reboot"],
    "CAP_SYS_MODULE": [],
    "CAP_SYS_PTRACE": ["ptrace", "process_vm_readv", "process_vm_writev"],
    "CAP_SYS_RAWIO": ["iopl", "ioperm"],
    "CAP_SYS_TIME": ["settimeofday", "stime", "clock_settime", "clock_settime64", "adjtimex", "clock_adjtime", "clock_adjtime64"],
    "CAP_DAC_READ_SEARCH": ["open_by_handle_at"],
    "CAP_SYS_NICE": ["get_mempolicy", "mbind", "set_mempolicy", "move_pages"],
    "CAP_SYSLOG": [],
    "CAP_BPF": [],
    "CAP_PERFMON": [],
}

_CLONE_NAMESPACE_FLAGS = [0x00020000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x02000000]


def _architectures() -> list[str]:
    machine = platform.machine()
    if machine in ("x86_64", "amd64"):
        return ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    if machine in ("aarch64", "arm64"):
        return ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    if machine == "ppc64le":
        return ["SCMP_ARCH_PPC64LE"]
    if machine == "s390x":
        return ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"]
    return []


def default_profile(capabilities: set[str] | frozenset[str]) -> dict[str, Any]:
    """The RuntimeDefault profile for a container holding `capabilities` (CAP_* names)."""
    blocked = list(_ALWAYS_BLOCKED)
    for cap, calls in _BY_CAPABILITY.items():
        if cap not in capabilities:
            blocked.extend(calls)
    unique = sorted(set(blocked))
    syscalls: list[dict[str, Any]] = [
        {"names": unique, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        # clone3 hides its flags from seccomp: make libc fall back to clone.
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    if "CAP_SYS_ADMIN" not in capabilities:
        flag_index = 1 if platform.machine() == "s390x" else 0
        for flag in _CLONE_NAMESPACE_FLAGS:
            syscalls.append({
                "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
                "args": [{"index": flag_index, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            })
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": _architectures(), "syscalls": syscalls}


_ACTIONS = {"SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
            "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_NOTIFY"}


def load_profile(path: str) -> dict[str, Any]:
    """A Localhost profile: a seccomp JSON file (Docker format) on the host, checked."""
    if not os.path.isabs(path):
        raise InvalidArgument(f"seccomp profile path must be absolute: {path!r}")
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(4 * 1024 * 1024))
    except FileNotFoundError:
        raise InvalidArgument(f"seccomp profile {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"seccomp profile {path} is not valid JSON: {e}") from None
    return validate(data, path)


def validate(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("defaultAction") not in _ACTIONS:
        raise InvalidArgument(f"seccomp profile {where}: missing or unknown defaultAction")
    syscalls = data.get("syscalls") or []
    if not isinstance(syscalls, list):
        raise InvalidArgument(f"seccomp profile {where}: syscalls must be a list")
    out_calls = []
    for i, rule in enumerate(syscalls):
        if not isinstance(rule, dict):
            raise InvalidArgument(f"seccomp profile {where}: syscalls[{i}] is not an object")
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        if not names or not all(isinstance(n, str) for n in names):
            raise InvalidArgument(f"seccomp profile {where}: syscalls[{i}] has no names")
        if rule.get("action") not in _ACTIONS:
            raise InvalidArgument(f"seccomp profile {where}: syscalls[{i}] has an unknown action")
        out = {"names": names, "action": rule["action"]}
        for key in ("errnoRet", "args"):
            if key in rule:
                out[key] = rule[key]
        out_calls.append(out)
    profile: dict[str, Any] = {"defaultAction": data["defaultAction"], "syscalls": out_calls}
    if "defaultErrnoRet" in data:
        profile["defaultErrnoRet"] = data["defaultErrnoRet"]
    arches = data.get("architectures")
    if not arches and isinstance(data.get("archMap"), list):
        arches = []
        for entry in data["archMap"]:
            arches.append(entry.get("architecture"))
            arches.extend(entry.get("subArchitectures") or [])
    profile["architectures"] = [a for a in (arches or _architectures()) if isinstance(a, str)]
    if data.get("flags"):
        profile["flags"] = data["flags"]
    return profile
