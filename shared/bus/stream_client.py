"""The frontend's end of a stream session with a daemon (the protocol: streams.py)."""

from __future__ import annotations

import asyncio
import os

from shared.bus.stream_frames import (CREDIT, TERMINAL_SIZE, END, HEADER, INPUT_WINDOW, MAX_FRAME, OPEN, RESIZE, STDERR,
                                      STDIN, STDIN_END, STDOUT, WINDOW, End, ProtocolError, decode_end, frame,
                                      read_frame)
from shared.errors import Unavailable


class ClientStream:
    """The frontend's end of one session: reads output and the end, writes input within its credit."""

    def __init__(self, service: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.service = service
        self._reader = reader
        self._writer = writer
        self._credit = INPUT_WINDOW
        self._credit_open = asyncio.Event()
        self._credit_open.set()
        self.ended = False

    @classmethod
    async def connect(cls, service: str, path: str | os.PathLike[str], token: str) -> "ClientStream":
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_FRAME)
        except OSError as e:
            raise Unavailable(f"cannot reach {service}'s streams at {path}: {e.strerror or e}") from None
        writer.write(frame(OPEN, token.encode()))
        return cls(service, reader, writer)

    async def read(self) -> tuple[int, bytes] | End:
        """(STDOUT or STDERR, bytes), or the session's End; raises Unavailable when the daemon went away."""
        if self.ended:
            raise Unavailable(f"the {self.service} stream has ended")
        while True:
            try:
                kind, payload = await read_frame(self._reader)
                if kind == WINDOW and len(payload) == CREDIT.size:
                    self._credit += CREDIT.unpack(payload)[0]
                    self._credit_open.set()
                    continue
                if kind in (STDOUT, STDERR):
                    return kind, payload
                if kind != END:
                    raise ProtocolError(f"unexpected frame kind {kind}")
                end = decode_end(payload)
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                self._finish()
                raise Unavailable(f"{self.service} went away during the session (restarted or stopped)") from None
            except ProtocolError as e:
                self._finish()
                raise Unavailable(f"{self.service} broke the stream protocol: {e}") from None
            self._finish()
            return end

    def _finish(self) -> None:
        self.ended = True
        self._credit_open.set()  # writers waiting for credit give up

    async def write(self, data: bytes) -> None:
        """Input bytes, sent as the daemon's credit allows; ConnectionResetError once the session ended."""
        view = memoryview(data)
        while view:
            while self._credit <= 0 and not self.ended:
                self._credit_open.clear()
                await self._credit_open.wait()
            if self.ended:
                raise ConnectionResetError(f"the {self.service} session has ended")
            size = min(len(view), self._credit, MAX_FRAME)
            self._writer.write(HEADER.pack(STDIN, size) + view[:size])
            self._credit -= size
            view = view[size:]
            await self._writer.drain()

    async def end_input(self) -> None:
        await self._control(frame(STDIN_END))

    async def resize(self, width: int, height: int) -> None:
        await self._control(frame(RESIZE, TERMINAL_SIZE.pack(width, height)))

    async def _control(self, data: bytes) -> None:
        if self.ended or self._writer.is_closing():
            return
        self._writer.write(data)
        try:
            await self._writer.drain()
        except (ConnectionError, OSError):
            pass  # the next read says why

    async def close(self) -> None:
        """Closing ends the session in the daemon (its process is killed) unless it already ended."""
        self._finish()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
