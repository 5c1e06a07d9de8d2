"""What each runtime handler and this machine can do, found out once.

Detected at start, and again when a reload changes the runtime handlers, so
that Status (asked every few seconds) and CreateContainer never run a program
or probe the kernel themselves.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from services.runtimed import cgroups, runc
from shared.config import RuntimeConfig, RuntimeHandler
from shared.errors import CriopyError
from shared.libc import syscall

log = structlog.get_logger(__name__)

# runc learned the `rro` mount option in 1.1; it needs mount_setattr(2), new in Linux 5.12.
RRO_MIN_RUNC = (1, 1)
RRO_MIN_KERNEL = (5, 12)
# mount_setattr has this number on every architecture but alpha (calls added since 5.1 share one table).
_SYS_MOUNT_SETATTR = 442


@dataclass(frozen=True)
class HostFeatures:
    kernel: str
    mount_setattr: bool
    mount_setattr_reason: str
    hugetlb: bool
    hugetlb_reason: str


@dataclass(frozen=True)
class HandlerFeatures:
    name: str
    runtime_path: str
    runtime_version: str
    recursive_read_only_mounts: bool
    reason: str  # why recursive read-only mounts are, or are not, available
    program: str = ""  # the runtime's name from its --version ("runc")

    @property
    def starts_through_exec_fifo(self) -> bool:
        """Whether runtimed may start its created containers itself (services/runtimed/exec_fifo.py)."""
        return self.program == "runc"


def _major_minor(text: str) -> tuple[int, int] | None:
    match = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else None


def _mount_setattr_errno() -> int:
    """The error of a mount_setattr call with arguments it must refuse: ENOSYS when it does not exist."""
    try:
        syscall(_SYS_MOUNT_SETATTR, -1, b"", 0, None, 0)
    except OSError as e:
        return e.errno or 0
    return 0


def mount_setattr(release: str) -> tuple[bool, str]:
    """Whether the kernel can make a mount tree read-only recursively, and why (not)."""
    kernel = _major_minor(release)
    if kernel is None:
        return False, f"cannot read the kernel version {release!r}"
    if kernel < RRO_MIN_KERNEL:
        return False, f"kernel {release} is older than 5.12 and has no mount_setattr"
    # A version can hide a backport or a seccomp filter around us: ask the kernel itself.
    err = _mount_setattr_errno()
    if err in (errno.ENOSYS, errno.EPERM):
        return False, f"mount_setattr is not available here: {os.strerror(err)}"
    return True, f"kernel {release} has mount_setattr"


def detect_host() -> HostFeatures:
    release = os.uname().release
    setattr_ok, setattr_reason = mount_setattr(release)
    cgroups.refresh_mounts()
    hugetlb_ok, hugetlb_reason = cgroups.hugetlb_usable()
    return HostFeatures(kernel=release, mount_setattr=setattr_ok, mount_setattr_reason=setattr_reason,
                        hugetlb=hugetlb_ok, hugetlb_reason=hugetlb_reason)


async def detect_handler(name: str, handler: RuntimeHandler, host: HostFeatures) -> HandlerFeatures:
    path = handler.runtime_path
    try:
        program, version = await runc.version(path)
    except CriopyError as e:
        return HandlerFeatures(name, path, "", False, f"cannot learn the version of {path}: {e.message}")

    def result(supported: bool, reason: str) -> HandlerFeatures:
        return HandlerFeatures(name, path, version, supported, reason, program)

    if program != "runc":
        return result(False, f"{path} is {program}, not runc")
    parsed = _major_minor(version)
    if parsed is None:
        return result(False, f"cannot read runc's version {version!r}")
    if parsed < RRO_MIN_RUNC:
        return result(False, f"runc {version} is older than 1.1")
    if not host.mount_setattr:
        return result(False, host.mount_setattr_reason)
    return result(True, f"runc {version} and {host.mount_setattr_reason}")


@dataclass
class Features:
    """The detected features of this machine and of each configured runtime handler."""

    host: HostFeatures | None = None
    handlers: dict[str, HandlerFeatures] = field(default_factory=dict)
    default_handler: str = ""

    async def detect(self, rc: RuntimeConfig) -> None:
        if self.host is None:
            self.host = detect_host()
            log.info("host_features", kernel=self.host.kernel, hugetlb=self.host.hugetlb,
                     hugetlb_reason=self.host.hugetlb_reason, mount_setattr=self.host.mount_setattr)
            if not self.host.hugetlb:
                log.warning("hugepage_limits_ignored", reason=self.host.hugetlb_reason)
        host = self.host
        found = await asyncio.gather(*(detect_handler(name, h, host) for name, h in sorted(rc.runtimes.items())))
        self.handlers = {f.name: f for f in found}
        self.default_handler = rc.default_runtime
        for f in found:
            log.info("runtime_handler_features", handler=f.name, runtime_path=f.runtime_path,
                     runtime_version=f.runtime_version, recursive_read_only_mounts=f.recursive_read_only_mounts,
                     reason=f.reason)

    @property
    def hugetlb(self) -> bool:
        return self.host is not None and self.host.hugetlb

    def handler(self, name: str) -> HandlerFeatures | None:
        return self.handlers.get(name or self.default_handler)

    def report(self) -> dict[str, Any]:
        """Plain data for runtimed's health: the frontend builds CRI Status from it."""
        host = self.host
        return {
            "default_runtime_handler": self.default_handler,
            "runtime_handlers": [asdict(f) for f in self.handlers.values()],
            "hugetlb": {"usable": bool(host and host.hugetlb),
                        "reason": host.hugetlb_reason if host else "not detected yet"},
        }
