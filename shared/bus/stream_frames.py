"""The frames of a stream session between the frontend and a daemon (see streams.py).

Every frame is a 5-byte header, kind (1 byte) and payload length (4 bytes,
network order), then the payload, at most MAX_FRAME bytes.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

import msgpack

# Frame kinds. Frontend to daemon:
OPEN, STDIN, STDIN_END, RESIZE = 1, 2, 3, 4
# Daemon to frontend:
STDOUT, STDERR, WINDOW, END = 5, 6, 7, 8

HEADER = struct.Struct("!BI")
TERMINAL_SIZE = struct.Struct("!HH")
CREDIT = struct.Struct("!I")
MAX_FRAME = 256 * 1024
# Bytes read at once from what a session streams out.
READ_SIZE = 256 * 1024
# STDIN bytes a session may have received and not yet consumed.
INPUT_WINDOW = 512 * 1024
# Characters of an END frame's error that are kept.
MAX_ERROR = 8192


@dataclass
class End:
    """How a session ended: the process's exit code, or why it could not run to its end."""

    exit_code: int | None = None
    error: str | None = None


class ProtocolError(Exception):
    """A frame that breaks the protocol; the connection is closed."""


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def end_frame(end: End) -> bytes:
    error = end.error[:MAX_ERROR] if end.error is not None else None
    return frame(END, msgpack.packb({"exit_code": end.exit_code, "error": error}))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame; asyncio.IncompleteReadError at the end of the connection."""
    kind, size = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > MAX_FRAME:
        raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    return kind, await reader.readexactly(size) if size else b""


def decode_end(payload: bytes) -> End:
    try:
        body = msgpack.unpackb(payload, raw=False)
        code, error = body.get("exit_code"), body.get("error")
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"END frame is not a msgpack map: {e}") from None
    if (code is not None and not isinstance(code, int)) or (error is not None and not isinstance(error, str)):
        raise ProtocolError("END frame with a malformed exit code or error")
    return End(code, error)
