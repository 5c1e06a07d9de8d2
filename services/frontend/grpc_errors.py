"""The one place where crio-py's typed errors become gRPC status codes."""

from __future__ import annotations

import grpc

from shared.errors import CriopyError


def status_code(error: CriopyError) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[error.code]
    except KeyError:
        return grpc.StatusCode.UNKNOWN
