"""WebSocket connections on asyncio streams, with the `websockets` sans-I/O protocol.

The streaming server reads the HTTP request head itself (it also serves SPDY
upgrades on the same port), then hands it to `websockets.server.ServerProtocol`
for the handshake and the framing. Subprotocols are negotiated here, the way
the kubelet's wsstream does: the first of the client's offers the server
knows, and none offered selects the unnamed protocol when the server has one.
Offers are read as a plain comma-separated list, as Go's servers read them:
Kubernetes names such as `SPDY/3.1+portforward.k8s.io` are not RFC 7230
tokens, and `websockets`' own strict parsing would refuse them.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from websockets.datastructures import Headers
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from services.frontend.streaming.http_head import RequestHead, response

# A single client message larger than this closes the connection.
MAX_MESSAGE = 1024 * 1024


class WebSocketClosed(ConnectionError):
    pass


class NoCommonSubprotocol(Exception):
    pass


def select_subprotocol(offered: Sequence[str], supported: Sequence[str]) -> str | None:
    """The subprotocol to answer with; None for the unnamed one (`""` in `supported`)."""
    for name in offered:
        if name and name in supported:
            return name
    if not offered and "" in supported:
        return None
    raise NoCommonSubprotocol(f"requested protocol(s) are not supported: {list(offered)}; "
                              f"supports {[s for s in supported if s]}")


class _NegotiatedServerProtocol(ServerProtocol):
    """`ServerProtocol` answering with a subprotocol chosen before the handshake."""

    def __init__(self, subprotocol: str | None, *, max_size: int) -> None:
        super().__init__(max_size=max_size)
        self._chosen = subprotocol

    def process_subprotocol(self, headers: Headers) -> Subprotocol | None:
        return Subprotocol(self._chosen) if self._chosen is not None else None


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
    async def handshake(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: RequestHead,
                        subprotocols: Sequence[str]) -> "WebSocket | None":
        """Answer the upgrade request whose head was already read; the socket, or None when refused."""
        try:
            chosen = select_subprotocol(head.header_values("sec-websocket-protocol"), subprotocols)
        except NoCommonSubprotocol as e:
            # 403, as the kubelet's wsstream answers a failed negotiation.
            writer.write(response(403, "Forbidden", f"unable to upgrade: {e}\n"))
            await writer.drain()
            return None
        protocol = _NegotiatedServerProtocol(chosen, max_size=MAX_MESSAGE)
        protocol.receive_data(head.raw)
        request = next((e for e in protocol.events_received() if isinstance(e, Request)), None)
        if request is None:
            answer = protocol.reject(400, "not a WebSocket request\n")
        else:
            answer = protocol.accept(request)
        protocol.send_response(answer)
        for data in protocol.data_to_send():
            if data:
                writer.write(data)
        await writer.drain()
        if answer.status_code != 101:
            return None
        return cls(reader, writer, protocol, chosen)

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

    def send_nowait(self, data: bytes, *, text: bool = False) -> None:
        """Queue one message; `drain()` waits until the socket has taken it."""
        if self.protocol.state is not State.OPEN:
            raise WebSocketClosed("the WebSocket is closed")
        if text:
            self.protocol.send_text(data)
        else:
            self.protocol.send_binary(data)
        self._flush()

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            raise WebSocketClosed(str(e)) from None

    async def send(self, data: bytes, *, text: bool = False) -> None:
        self.send_nowait(data, text=text)
        await self.drain()

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
    """A WebSocket's binary messages read and written as one byte stream, for SPDY tunnelled in it.

    A message is a chunk of the stream cut anywhere, not a frame: client-go's
    tunnel writes one SPDY frame as several messages. A text message is a
    protocol error, as in client-go, and ends the stream.
    """

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    async def read(self) -> bytes:
        while True:
            message = await self.ws.recv()
            if message is None:
                return b""
            if isinstance(message, str):
                await self.ws.close(1003, "the tunnel carries binary messages only")
                return b""
            if message:
                return message

    def write(self, data: bytes) -> None:
        if self.ws.open:
            self.ws.send_nowait(data)

    async def drain(self) -> None:
        if not self.ws.open:
            raise WebSocketClosed("the WebSocket is closed")
        await self.ws.drain()

    async def close(self) -> None:
        await self.ws.close()
