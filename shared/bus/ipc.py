"""The filesystem side of `ipc://` endpoints: their directory, stale files, permissions."""

from __future__ import annotations

import os


def prepare(endpoint: str) -> None:
    """Before a bind: make the socket's directory, remove a file left by a predecessor killed without cleanup."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint.removeprefix("ipc://")
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)


def restrict(endpoint: str) -> None:
    """After a bind: only the owner and its group (the frontend's) may connect."""
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint.removeprefix("ipc://"), 0o660)
