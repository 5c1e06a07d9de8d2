"""Seccomp profiles: the built-in RuntimeDefault profile, Localhost profiles, and what runc is given.

A profile is written in the format of the containers/common seccomp.json
files that CRI-O and Podman read: rules name system calls, an action, argument
conditions, and `includes`/`excludes` filters on the container's capabilities
and the machine's architecture. `resolve` keeps the rules whose filters hold
for one container and returns the plain `linux.seccomp` section of its OCI
spec, which runc compiles into a BPF filter.

The RuntimeDefault profile is an allow-list, the same as containers/common's
default profile, with CRI-O's one change (`unshare` only with CAP_SYS_ADMIN):
anything not listed fails with ENOSYS, so that programs fall back as they do
on an older kernel; the calls that reach the kernel's global state (swap,
kexec, modules...) fail with EPERM; a few calls are allowed only to a
container holding the capability they need, or only with harmless arguments.
"""

from __future__ import annotations

import errno
import json
import os
import platform
from typing import Any, Iterable

from shared.errors import InvalidArgument

# Address families and the netlink protocol that argument rules look at.
AF_NETLINK, AF_ALG, AF_VSOCK = 16, 38, 40
NETLINK_AUDIT = 9

MAX_PROFILE_BYTES = 4 * 1024 * 1024

ACTIONS = frozenset({
    "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG",
})
OPERATORS = frozenset({
    "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
})
ARCHITECTURES = frozenset({
    "SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32", "SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC", "SCMP_ARCH_PPC64", "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X", "SCMP_ARCH_RISCV64", "SCMP_ARCH_LOONGARCH64",
})
FLAGS = frozenset({"SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"})

# `uname -m` -> the architecture names that `includes.arches` uses (libseccomp's short names).
_SHORT_ARCH = {
    "x86_64": "amd64", "amd64": "amd64", "i386": "x86", "i686": "x86", "aarch64": "arm64",
    "arm64": "arm64", "armv7l": "arm", "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
    "riscv64": "riscv64", "mips64": "mips64",
}
# A short name -> the `archMap` entry whose architectures a filter for it covers.
_SCMP_ARCH = {
    "amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64", "s390x": "SCMP_ARCH_S390X",
    "mips64": "SCMP_ARCH_MIPS64", "mips64n32": "SCMP_ARCH_MIPS64N32",
    "mipsel64": "SCMP_ARCH_MIPSEL64", "mipsel64n32": "SCMP_ARCH_MIPSEL64N32",
}


def native_arch() -> str:
    """This machine's architecture as profiles name it (amd64, arm64, ...)."""
    machine = platform.machine()
    return _SHORT_ARCH.get(machine, machine)


# ---------------------------------------------------------------------------
# The RuntimeDefault profile


def _arg(index: int, op: str, value: int) -> dict[str, Any]:
    return {"index": index, "value": value, "op": "SCMP_CMP_" + op}


def _rule(names: str, action: str, *, errno_ret: int | None = None, args: Iterable[dict] = (),
          caps: Iterable[str] = (), unless: Iterable[str] = (), arches: Iterable[str] = ()) -> dict[str, Any]:
    """One rule: `caps` must all be held, `unless` any held drops it, `arches` must include this machine."""
    rule: dict[str, Any] = {"names": names.split(), "action": action, "args": list(args)}
    if errno_ret is not None:
        rule["errnoRet"] = errno_ret
    if caps or arches:
        rule["includes"] = {k: list(v) for k, v in (("caps", caps), ("arches", arches)) if v}
    if unless:
        rule["excludes"] = {"caps": list(unless)}
    return rule


def _allow(names: str, **filters: Any) -> dict[str, Any]:
    return _rule(names, "SCMP_ACT_ALLOW", **filters)


def _refuse(names: str, errno_ret: int = errno.EPERM, **filters: Any) -> dict[str, Any]:
    return _rule(names, "SCMP_ACT_ERRNO", errno_ret=errno_ret, **filters)


def _needs(cap: str, names: str) -> list[dict[str, Any]]:
    """Allowed with `cap`, EPERM without it."""
    return [_allow(names, caps=[cap]), _refuse(names, unless=[cap])]


_ALLOWED = """
    _llseek _newselect accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown
    chown32 clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64
    clock_nanosleep clock_nanosleep_time64 clone clone3 close close_range connect copy_file_range creat
    dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait
    epoll_wait_old eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64
    fadvise64_64 fallocate fanotify_init fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchown32
    fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr flock fork fremovexattr fsconfig fsetxattr
    fsmount fsopen fspick fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate ftruncate64 futex
    futex_requeue futex_time64 futex_wait futex_waitv futex_wake futimesat get_mempolicy get_robust_list
    get_thread_area getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32 getgid getgid32
    getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority getrandom
    getresgid getresgid32 getresuid getresuid32 getrlimit getrusage getsid getsockname getsockopt gettid
    gettimeofday getuid getuid32 getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch
    io_cancel io_destroy io_getevents io_setup io_submit ioctl ioprio_get ioprio_set ipc keyctl kill
    landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link linkat
    listen listxattr llistxattr lremovexattr lseek lsetxattr lstat lstat64 madvise mbind membarrier
    memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mmap2 mount
    mount_setattr move_mount mprotect mq_getsetattr mq_notify mq_open mq_timedreceive
    mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap msgctl msgget msgrcv msgsnd
    msync munlock munlockall munmap name_to_handle_at nanosleep newfstatat open open_tree openat openat2
    pause pidfd_getfd pidfd_open pidfd_send_signal pipe pipe2 pivot_root pkey_alloc pkey_free
    pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv preadv2 prlimit64 process_mrelease
    process_vm_readv process_vm_writev pselect6 pselect6_time64 ptrace pwrite64 pwritev pwritev2 read
    readahead readlink readlinkat readv reboot recv recvfrom recvmmsg recvmmsg_time64 recvmsg
    remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq rt_sigaction
    rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait
    rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_get_priority_max sched_get_priority_min
    sched_getaffinity sched_getattr sched_getparam sched_getscheduler sched_rr_get_interval
    sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam sched_setscheduler
    sched_yield seccomp select semctl semget semop semtimedop semtimedop_time64 send sendfile sendfile64
    sendmmsg sendmsg sendto set_mempolicy set_robust_list set_thread_area set_tid_address setfsgid
    setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setns setpgid
    setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32
    setrlimit setsid setsockopt setuid setuid32 setxattr shmat shmctl shmdt shmget shutdown sigaltstack
    signal signalfd signalfd4 sigprocmask sigreturn socketcall socketpair splice stat stat64 statfs
    statfs64 statx symlink symlinkat sync sync_file_range syncfs sysinfo syslog tee tgkill time
    timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64
    timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times tkill
    truncate truncate64 ugetrlimit umask umount umount2 uname unlink unlinkat utime utimensat
    utimensat_time64 utimes vfork wait4 waitid waitpid write writev
"""

# Refused with EPERM whatever the container holds: swap, kexec, obsolete and dangerous calls.
_REFUSED = """
    bdflush cachestat io_pgetevents io_pgetevents_time64 kexec_file_load kexec_load map_shadow_stack
    migrate_pages move_pages nfsservctl nice oldfstat oldlstat oldolduname oldstat olduname
    pciconfig_iobase pciconfig_read pciconfig_write sgetmask ssetmask swapoff swapon syscall sysfs uselib
    userfaultfd ustat vm86 vm86old vmsplice
"""

DEFAULT_PROFILE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": errno.ENOSYS,
    "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
        {"architecture": "SCMP_ARCH_MIPS64", "subArchitectures": ["SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64N32"]},
        {"architecture": "SCMP_ARCH_MIPS64N32", "subArchitectures": ["SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64"]},
        {"architecture": "SCMP_ARCH_MIPSEL64", "subArchitectures": ["SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64N32"]},
        {"architecture": "SCMP_ARCH_MIPSEL64N32", "subArchitectures": ["SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64"]},
        {"architecture": "SCMP_ARCH_S390X", "subArchitectures": ["SCMP_ARCH_S390"]},
    ],
    "syscalls": [
        _refuse(_REFUSED),
        _allow(_ALLOWED),
        # personality(2) only to switch to the personas ordinary programs use, or to query.
        *(_allow("personality", args=[_arg(0, "EQ", persona)]) for persona in (0x0, 0x8, 0x20000, 0x20008, 0xffffffff)),
        _allow("sync_file_range2 swapcontext", arches=["ppc64le"]),
        _allow("arm_fadvise64_64 arm_sync_file_range breakpoint cacheflush set_tls sync_file_range2",
               arches=["arm", "arm64"]),
        _allow("arch_prctl", arches=["amd64", "x32"]),
        _allow("modify_ldt", arches=["amd64", "x32", "x86"]),
        _allow("s390_pci_mmio_read s390_pci_mmio_write s390_runtime_instr", arches=["s390", "s390x"]),
        _allow("riscv_flush_icache riscv_hwprobe", arches=["riscv64"]),
        *_needs("CAP_DAC_READ_SEARCH", "open_by_handle_at"),
        _allow("bpf lookup_dcookie perf_event_open quotactl quotactl_fd setdomainname sethostname setns",
               caps=["CAP_SYS_ADMIN"]),
        _refuse("lookup_dcookie quotactl quotactl_fd setdomainname sethostname setns", unless=["CAP_SYS_ADMIN"]),
        *_needs("CAP_SYS_CHROOT", "chroot"),
        *_needs("CAP_SYS_MODULE", "delete_module finit_module init_module query_module"),
        *_needs("CAP_SYS_PACCT", "acct"),
        *_needs("CAP_SYS_PTRACE", "kcmp process_madvise"),
        *_needs("CAP_SYS_RAWIO", "ioperm iopl"),
        *_needs("CAP_SYS_TIME", "clock_settime clock_settime64 settimeofday stime"),
        *_needs("CAP_SYS_TTY_CONFIG", "vhangup"),
        # socket(2): never VM sockets nor the kernel crypto API; the audit netlink socket needs CAP_AUDIT_WRITE.
        _refuse("socket", args=[_arg(0, "EQ", AF_VSOCK)]),
        _refuse("socket", args=[_arg(0, "EQ", AF_ALG)]),
        _refuse("socket", errno.EINVAL, args=[_arg(0, "EQ", AF_NETLINK), _arg(2, "EQ", NETLINK_AUDIT)],
                unless=["CAP_AUDIT_WRITE"]),
        _allow("socket", args=[_arg(0, "EQ", AF_NETLINK), _arg(2, "NE", NETLINK_AUDIT)], unless=["CAP_AUDIT_WRITE"]),
        _allow("socket", args=[_arg(0, "NE", AF_NETLINK)], unless=["CAP_AUDIT_WRITE"]),
        _allow("socket", args=[_arg(0, "NE", AF_VSOCK)], caps=["CAP_AUDIT_WRITE"]),
        _refuse("bpf", unless=["CAP_SYS_ADMIN", "CAP_BPF"]),
        _allow("bpf", caps=["CAP_BPF"]),
        _refuse("perf_event_open", unless=["CAP_SYS_ADMIN", "CAP_PERFMON"]),
        _allow("perf_event_open", caps=["CAP_PERFMON"]),
        # CRI-O's change to the containers/common profile: new namespaces through unshare(2) only
        # with CAP_SYS_ADMIN; without it the call gets the default ENOSYS.
        _allow("unshare", caps=["CAP_SYS_ADMIN"]),
    ],
}


# ---------------------------------------------------------------------------
# From a profile to runc's `linux.seccomp`


def default_profile(capabilities: Iterable[str], arch: str | None = None) -> dict[str, Any]:
    """The RuntimeDefault section for a container whose bounding set is `capabilities` (CAP_* names)."""
    return resolve(DEFAULT_PROFILE, capabilities, "the default profile", arch)


def load_profile(path: str, capabilities: Iterable[str], arch: str | None = None) -> dict[str, Any]:
    """The section for a profile file on this machine (Localhost, or crio.conf's seccomp_profile)."""
    if not path:
        raise InvalidArgument("seccomp profile path is empty")
    if not os.path.isabs(path):
        raise InvalidArgument(f"seccomp profile path must be absolute: {path!r}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except FileNotFoundError:
        raise InvalidArgument(f"seccomp profile {path} does not exist") from None
    except OSError as e:
        raise InvalidArgument(f"seccomp profile {path} cannot be read: {e.strerror}") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise InvalidArgument(f"seccomp profile {path} is larger than {MAX_PROFILE_BYTES} bytes")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InvalidArgument(f"seccomp profile {path} is not valid JSON: {e}") from None
    return resolve(data, capabilities, f"seccomp profile {path}", arch)


def resolve(profile: Any, capabilities: Iterable[str], where: str, arch: str | None = None) -> dict[str, Any]:
    """Check `profile` and keep the rules whose filters hold for these capabilities on `arch`."""
    arch = arch or native_arch()
    caps = frozenset(capabilities)
    if not isinstance(profile, dict):
        raise InvalidArgument(f"{where}: a profile is a JSON object")
    default = profile.get("defaultAction")
    if default not in ACTIONS:
        raise InvalidArgument(f"{where}: missing or unknown defaultAction {default!r}")
    out: dict[str, Any] = {"defaultAction": default}
    default_errno = _errno(profile, "defaultErrnoRet", "defaultErrno", where)
    if default_errno is not None:
        out["defaultErrnoRet"] = default_errno
    out["architectures"] = _architectures(profile, arch, where)
    flags = profile.get("flags") or []
    if not isinstance(flags, list) or any(f not in FLAGS for f in flags):
        raise InvalidArgument(f"{where}: flags must be a list of {sorted(FLAGS)}")
    if flags:
        out["flags"] = list(flags)
    rules = profile.get("syscalls") or []
    if not isinstance(rules, list):
        raise InvalidArgument(f"{where}: syscalls must be a list")
    out["syscalls"] = [kept for i, rule in enumerate(rules)
                       if (kept := _rule_for(rule, caps, arch, f"{where}: syscalls[{i}]")) is not None]
    return out


def _architectures(profile: dict[str, Any], arch: str, where: str) -> list[str]:
    arches, arch_map = profile.get("architectures"), profile.get("archMap")
    if arches and arch_map:
        raise InvalidArgument(f"{where}: give either architectures or archMap, not both")
    if arches:
        if not isinstance(arches, list) or any(a not in ARCHITECTURES for a in arches):
            raise InvalidArgument(f"{where}: unknown architecture in {arches!r}")
        return list(arches)
    if not arch_map:
        return []
    if not isinstance(arch_map, list):
        raise InvalidArgument(f"{where}: archMap must be a list")
    for entry in arch_map:
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{where}: archMap entries are objects")
        names = [entry.get("architecture"), *(entry.get("subArchitectures") or [])]
        if any(a not in ARCHITECTURES for a in names):
            raise InvalidArgument(f"{where}: unknown architecture in archMap entry {entry!r}")
        # Only this machine's entry applies; on another machine libseccomp takes the native one.
        if names[0] == _SCMP_ARCH.get(arch):
            return names
    return []


def _rule_for(rule: Any, caps: frozenset[str], arch: str, where: str) -> dict[str, Any] | None:
    """The runc form of one rule, or None when its includes/excludes leave it out."""
    if not isinstance(rule, dict):
        raise InvalidArgument(f"{where} is not an object")
    if rule.get("name") and rule.get("names"):
        raise InvalidArgument(f"{where}: give either name or names, not both")
    names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
    if not names or not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise InvalidArgument(f"{where} names no system call")
    action = rule.get("action")
    if action not in ACTIONS:
        raise InvalidArgument(f"{where}: unknown action {action!r}")
    includes, excludes = _filter(rule, "includes", where), _filter(rule, "excludes", where)
    out: dict[str, Any] = {"names": list(names), "action": action}
    errno_ret = _errno(rule, "errnoRet", "errno", where)
    if errno_ret is not None:
        out["errnoRet"] = errno_ret
    args = [_checked_arg(a, f"{where}.args[{j}]") for j, a in enumerate(rule.get("args") or [])]
    if args:
        out["args"] = args
    if arch in excludes.get("arches", ()) or caps & set(excludes.get("caps", ())):
        return None
    if includes.get("arches") and arch not in includes["arches"]:
        return None
    if not set(includes.get("caps", ())) <= caps:
        return None
    return out


def _filter(rule: dict[str, Any], key: str, where: str) -> dict[str, list[str]]:
    value = rule.get(key) or {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: {key} must be an object")
    for field in ("caps", "arches"):
        items = value.get(field) or []
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise InvalidArgument(f"{where}: {key}.{field} must be a list of names")
    return {k: list(v) for k, v in value.items() if k in ("caps", "arches") and v}


def _checked_arg(arg: Any, where: str) -> dict[str, Any]:
    if not isinstance(arg, dict):
        raise InvalidArgument(f"{where} is not an object")
    index, value, value_two, op = arg.get("index"), arg.get("value", 0), arg.get("valueTwo", 0), arg.get("op")
    if not _uint(index) or index > 5:
        raise InvalidArgument(f"{where}: index must be 0 to 5")
    if not _uint(value) or not _uint(value_two) or max(value, value_two) >= 1 << 64:
        raise InvalidArgument(f"{where}: value and valueTwo must be unsigned 64-bit integers")
    if op not in OPERATORS:
        raise InvalidArgument(f"{where}: unknown op {op!r}")
    out = {"index": index, "value": value, "op": op}
    if value_two:
        out["valueTwo"] = value_two
    return out


def _errno(obj: dict[str, Any], number_key: str, name_key: str, where: str) -> int | None:
    """An errno given as a number or, in newer profiles, by name."""
    number, name = obj.get(number_key), obj.get(name_key)
    if number is not None:
        if not _uint(number) or number > 4095:
            raise InvalidArgument(f"{where}: {number_key} must be an errno number")
        return number
    if name:
        value = getattr(errno, str(name), None)
        if not isinstance(value, int) or not str(name).startswith("E"):
            raise InvalidArgument(f"{where}: unknown {name_key} {name!r}")
        return value
    return None


def _uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
