"""systemd's notify protocol: a service says it is ready; whoever started it listens.

A service sends datagrams of `KEY=value` lines to the unix socket named by
$NOTIFY_SOCKET: `READY=1` once it serves, `STOPPING=1` when it stops, and
`X_CRIOPY_LOG_LEVEL=<level>` whenever its log level is set. Under systemd the
units are Type=notify; under `criopy run` the supervisor listens
(`NotifyListener`), which is how it knows each service's readiness without
calling into the service. The kernel tells the listener which process sent
each datagram (SCM_CREDENTIALS), so a datagram is believed only from the
process it speaks for.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path
from typing import Callable

import structlog

log = structlog.get_logger(__name__)

ENV = "NOTIFY_SOCKET"
LOG_LEVEL = "X_CRIOPY_LOG_LEVEL"
_UCRED = struct.Struct("3i")
MAX_DATAGRAM = 4096


def _address(target: str) -> str:
    # systemd may name an abstract socket with a leading "@".
    return "\0" + target[1:] if target.startswith("@") else target


def notify(target: str | None, **fields: str) -> None:
    """Send `fields` to the listener at `target` (the value of $NOTIFY_SOCKET); nothing when there is none."""
    if not target:
        return
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    try:
        # Never blocking: a listener that does not read must not hold up the service.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.sendto(message, _address(target))
    except OSError as e:  # telling is best effort: the service serves whether or not anyone listens
        log.warning("notify_failed", target=target, error=str(e))


def parse(datagram: bytes) -> dict[str, str]:
    fields = {}
    for line in datagram.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


class NotifyListener:
    """The listening side: a datagram socket that hands each message, with its sender's pid, to `on_message`."""

    def __init__(self, path: Path, on_message: Callable[[int, dict[str, str]], None]) -> None:
        self.path = path
        self._on_message = on_message
        self._socket: socket.socket | None = None

    def start(self) -> None:
        """Bind (any local process may send; only known pids are believed) and read with the running loop.

        Its caller holds the supervisor's lock, so a file at the path is a predecessor's.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.path.unlink(missing_ok=True)
        sock.bind(str(self.path))
        # Services that run as users of their own must be able to send.
        os.chmod(self.path, 0o622)
        self._socket = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read)

    def _read(self) -> None:
        assert self._socket is not None
        while True:
            try:
                data, ancillary, _flags, _address = self._socket.recvmsg(
                    MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("notify_receive_failed", error=str(e))
                return
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    pid = _UCRED.unpack(payload[:_UCRED.size])[0]
            if pid is not None:
                self._on_message(pid, parse(data))

    def close(self) -> None:
        if self._socket is not None:
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
            self.path.unlink(missing_ok=True)
