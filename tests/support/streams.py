"""Reading a session's stream to its end, as the frontend does (shared/bus/streams.py)."""

from __future__ import annotations

from shared.bus.stream_client import ClientStream
from shared.bus.stream_frames import STDERR, STDOUT, End


async def read_all(client: ClientStream, *, limit: int = 1 << 30) -> tuple[bytes, bytes, End]:
    """Everything the session sends on stdout and stderr, and how it ended."""
    out = {STDOUT: b"", STDERR: b""}
    while True:
        got = await client.read()
        if isinstance(got, End):
            return out[STDOUT], out[STDERR], got
        out[got[0]] += got[1]
        assert len(out[STDOUT]) + len(out[STDERR]) <= limit, "more output than expected"
