"""WebSocket connections on asyncio streams, with the `websockets` sans-I/O protocol.

The streaming server reads the HTTP request head itself (it also serves SPDY
upgrades on the same port), then hands it to `websockets.server.ServerProtocol`
for the handshake and the framing. Subprotocols are negotiated the way the
kubelet's wsstream does: the first of the client's offers the server knows.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from websockets.frames import Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

# A single client message larger than this closes the connection.
MAX_MESSAGE = 1024 * 1024


class WebSocketClosed(ConnectionError):
    pass


class WebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: ServerProtocol,
                 subprotocol: str | None) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = protocol
        self.subprotocol = subprotocol
        self._pending: list[object] = []
        self._fragments: list[bytes] = []
        self._fragment_opcode: Opcode | None = None

    @classmethod
    async def handshake(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes,
                        subprotocols: Sequence[str]) -> tuple["WebSocket | None", Response]:
        """Answer the upgrade request whose head was already read; the socket or None when refused."""

        def select(_protocol: ServerProtocol, offered: Sequence[str]) -> str | None:
            for name in offered:
                if name in subprotocols:
                    return name
            if "" in subprotocols and not offered:
                return None
            from websockets.exceptions import NegotiationError
            raise NegotiationError(
                f"unable to negotiate a protocol: client supports {list(offered)}, "
                f"server accepts {[s for s in subprotocols if s]}")

        protocol = ServerProtocol(select_subprotocol=select, max_size=MAX_MESSAGE)
        protocol.receive_data(head)
        events = protocol.events_received()
        request = next((e for e in events if isinstance(e, Request)), None)
        if request is None:
            response = protocol.reject(400, "not a WebSocket request\n")
        else:
            response = protocol.accept(request)
        protocol.send_response(response)
        for data in protocol.data_to_send():
            if data:
                writer.write(data)
        await writer.drain()
        if response.status_code != 101:
            return None, response
        return cls(reader, writer, protocol, response.headers.get("Sec-WebSocket-Protocol")), response

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                if not self.writer.is_closing():
                    self.writer.write(data)
            else:
                if self.writer.can_write_eof() and not self.writer.is_closing():
                    try:
                        self.writer.write_eof()
                    except OSError:
                        pass

    async def recv(self) -> bytes | str | None:
        """The next whole message; None when the connection is closed."""
        while True:
            while self._pending:
                frame = self._pending.pop(0)
                message = self._assemble(frame)
                if message is not None:
                    return message
            if self.protocol.state is State.CLOSED:
                return None
            try:
                data = await self.reader.read(65536)
            except (ConnectionError, OSError):
                data = b""
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            self._pending.extend(self.protocol.events_received())
            self._flush()
            try:
                await self.writer.drain()
            except (ConnectionError, OSError):
                pass
            if not data and not self._pending:
                return None

    def _assemble(self, frame: object) -> bytes | str | None:
        opcode = getattr(frame, "opcode", None)
        if opcode in (Opcode.TEXT, Opcode.BINARY):
            self._fragment_opcode = opcode
            self._fragments = [bytes(frame.data)]  # type: ignore[attr-defined]
        elif opcode is Opcode.CONT:
            self._fragments.append(bytes(frame.data))  # type: ignore[attr-defined]
        else:
            return None  # ping/pong/close are answered by the protocol object
        if not frame.fin:  # type: ignore[attr-defined]
            return None
        data = b"".join(self._fragments)
        self._fragments = []
        if self._fragment_opcode is Opcode.TEXT:
            return data.decode(errors="replace")
        return data

    async def send(self, data: bytes, *, text: bool = False) -> None:
        if self.protocol.state is not State.OPEN:
            raise WebSocketClosed("the WebSocket is closed")
        if text:
            self.protocol.send_text(data)
        else:
            self.protocol.send_binary(data)
        self._flush()
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            raise WebSocketClosed(str(e)) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.protocol.state is State.OPEN:
            try:
                self.protocol.send_close(code, reason)
                self._flush()
                await asyncio.wait_for(self.writer.drain(), 5)
            except (ConnectionError, OSError, asyncio.TimeoutError):
                pass
        self.writer.close()

    @property
    def open(self) -> bool:
        return self.protocol.state is State.OPEN


class TunnelTransport:
    """A WebSocket's binary messages as one byte stream (SPDY tunnelled in WebSocket)."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    async def read(self) -> bytes:
        while True:
            message = await self.ws.recv()
            if message is None:
                return b""
            if isinstance(message, bytes):
                if message:
                    return message
                continue
            return b""  # a text message breaks the tunnel

    def write(self, data: bytes) -> None:
        if self.ws.protocol.state is State.OPEN:
            self.ws.protocol.send_binary(data)
            self.ws._flush()

    async def drain(self) -> None:
        await self.ws.writer.drain()

    def close(self) -> None:
        if self.ws.protocol.state is State.OPEN:
            self.ws.protocol.send_close(1000, "")
            self.ws._flush()
        self.ws.writer.close()
