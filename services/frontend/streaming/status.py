"""The Kubernetes Status objects written on the error stream when a command ends.

Shapes from k8s.io/kubelet/pkg/cri/streaming/remotecommand: with the v4 (and
later) protocols the error stream carries a JSON `metav1.Status`; the older
ones carry only the text of a failure.
"""

from __future__ import annotations

import json
from typing import Any


def success() -> dict[str, Any]:
    return {"metadata": {}, "status": "Success"}


def exit_code(cmd: list[str], code: int) -> dict[str, Any]:
    return {
        "metadata": {},
        "status": "Failure",
        "message": (f"command terminated with non-zero exit code: error executing command {_argv(cmd)}, "
                    f"exit code {code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def internal_error(message: str) -> dict[str, Any]:
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


def encode(status: dict[str, Any], *, json_status: bool) -> bytes:
    """The bytes for the error stream: the JSON object (v4+), or the failure text (v1-v3)."""
    if json_status:
        return json.dumps(status, separators=(",", ":")).encode()
    if status.get("status") == "Success":
        return b""
    return str(status.get("message", "")).encode()


def _argv(cmd: list[str]) -> str:
    return "[" + " ".join(cmd) + "]"
