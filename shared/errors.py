"""The typed errors of crio-py.

Every failure that crosses a process boundary is one of these. Each class
carries the name of the gRPC status code it maps to (the frontend maps the name
to a `grpc.StatusCode` in one place), so a daemon raises `NotFound(...)` and
the kubelet receives NOT_FOUND with the same message.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from shared import mountinfo


class CriopyError(Exception):
    """Base of every error that is reported to a caller."""

    code: str = "UNKNOWN"
    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retriable is not None:
            self.retriable = retriable

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retriable": self.retriable}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class Cancelled(CriopyError):
    code = "CANCELLED"


class InvalidArgument(CriopyError):
    code = "INVALID_ARGUMENT"


class DeadlineExceeded(CriopyError):
    code = "DEADLINE_EXCEEDED"


class NotFound(CriopyError):
    code = "NOT_FOUND"


class AlreadyExists(CriopyError):
    code = "ALREADY_EXISTS"


class PermissionDenied(CriopyError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(CriopyError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(CriopyError):
    code = "FAILED_PRECONDITION"


class Aborted(CriopyError):
    code = "ABORTED"


class OutOfRange(CriopyError):
    code = "OUT_OF_RANGE"


class Unimplemented(CriopyError):
    code = "UNIMPLEMENTED"


class Internal(CriopyError):
    code = "INTERNAL"


class Unavailable(CriopyError):
    code = "UNAVAILABLE"
    retriable = True


class DataLoss(CriopyError):
    code = "DATA_LOSS"


class Unauthenticated(CriopyError):
    code = "UNAUTHENTICATED"


class ConfigError(CriopyError):
    """A configuration file or flag is wrong; raised before anything starts."""

    code = "INVALID_ARGUMENT"


class ApiMismatch(Internal):
    """A service's class does not implement exactly its row of the bus API table; it does not start."""


# A full file system, and a user's or project's quota used up: to the caller both mean "no room".
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_no_space(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS


def out_of_space(err: BaseException | None, path: str | os.PathLike[str], what: str) -> ResourceExhausted:
    """The error for a write into `path` that found no room, naming the file system that is full.

    `what` says what was being done. Reads /proc/self/mountinfo: call it where
    blocking is allowed (a thread), which is where the write failed.
    """
    why = "disk quota exceeded" if getattr(err, "errno", None) == errno.EDQUOT else "no space left"
    return ResourceExhausted(f"{what}: {why} on the file system mounted at {file_system_of(path)} "
                             f"(writing in {os.fspath(path)})")


def file_system_of(path: str | os.PathLike[str]) -> str:
    """'<mount point> (<type>)' of the file system that holds `path`; the path itself when unknown."""
    try:
        real = os.path.realpath(path)
        existing = real
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        dev = os.stat(existing).st_dev
        table = mountinfo.current()
    except OSError:
        return os.fspath(path)
    device = f"{os.major(dev)}:{os.minor(dev)}"
    found: tuple[bool, int, str] | None = None
    for mount in table:
        point = mount.mount_point
        if not (real == point or real.startswith(point.rstrip("/") + "/")):
            continue
        # The deepest mount above the path, of the path's own device when one matches
        # (btrfs subvolumes have another); the last of mounts stacked on one point.
        key = (mount.device == device, len(point), f"{point} ({mount.fstype or 'unknown type'})")
        if found is None or key[:2] >= found[:2]:
            found = key
    return found[2] if found else os.fspath(path)


_BY_CODE: dict[str, type[CriopyError]] = {
    cls.code: cls
    for cls in (
        Cancelled, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted,
        OutOfRange, Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}

CODES: frozenset[str] = frozenset(_BY_CODE) | {"UNKNOWN"}


def from_wire(error: Any) -> CriopyError:
    """Rebuild a typed error from a bus reply's error map (never raises)."""
    if not isinstance(error, dict):
        return Internal(f"malformed error in reply: {error!r:.200}")
    code = error.get("code")
    message = str(error.get("message", ""))
    retriable = bool(error.get("retriable", False))
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        err = CriopyError(message, retriable=retriable)
        return err
    return cls(message, retriable=retriable)
