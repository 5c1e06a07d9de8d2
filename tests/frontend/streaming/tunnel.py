"""The client's end of a WebSocket whose binary messages carry a byte stream (SPDY tunnelled in it).

The opening handshake is written here by hand: the `websockets` client
refuses subprotocol names that are not RFC 7230 tokens, such as
`SPDY/3.1+portforward.k8s.io`, where gorilla's (client-go's) does not. The
framing after it is `websockets`' sans-I/O client protocol.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Sequence
from urllib.parse import urlsplit

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from tests.frontend.streaming.spdy_client import read_upgrade_response

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocketTunnel:
    """A byte transport (read/write/drain/close) over a WebSocket's binary messages.

    `split` cuts every write into messages of at most that many bytes, the
    way client-go's tunnel sends one SPDY frame as several messages.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, url: str,
                 headers: dict[str, str], split: int) -> None:
        self.reader = reader
        self.writer = writer
        self.headers = headers
        self.subprotocol = headers.get("sec-websocket-protocol")
        self.split = split
        self.protocol = ClientProtocol(parse_uri(url), state=State.OPEN)
        self._pending: list[Frame] = []

    @classmethod
    async def connect(cls, url: str, subprotocols: list[str], *, split: int = 0,
                      extra_headers: Sequence[tuple[str, str]] = ()) -> "WebSocketTunnel":
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {parts.path}{'?' + parts.query if parts.query else ''} HTTP/1.1",
                 f"Host: {parts.hostname}:{parts.port}", "Connection: Upgrade", "Upgrade: websocket",
                 "Sec-WebSocket-Version: 13", f"Sec-WebSocket-Key: {key}"]
        if subprotocols:
            lines.append("Sec-WebSocket-Protocol: " + ", ".join(subprotocols))
        lines += [f"{name}: {value}" for name, value in extra_headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        headers = await read_upgrade_response(reader, writer)
        expected = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            writer.close()
            raise AssertionError(f"bad Sec-WebSocket-Accept in {headers}")
        ws_url = "ws://" + parts.netloc + parts.path
        return cls(reader, writer, ws_url, headers, split)

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data and not self.writer.is_closing():
                self.writer.write(data)

    async def read(self) -> bytes:
        """The next chunk of the stream; b"" once the WebSocket is closed."""
        while True:
            while self._pending:
                event = self._pending.pop(0)
                if event.opcode in (Opcode.BINARY, Opcode.CONT) and event.data:
                    return bytes(event.data)
            if self.protocol.state is State.CLOSED:
                return b""
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

    def write(self, data: bytes) -> None:
        size = self.split or max(len(data), 1)
        for i in range(0, len(data), size):
            self.protocol.send_binary(data[i:i + size])
        self._flush()

    def write_text(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        self._flush()

    async def drain(self) -> None:
        await self.writer.drain()

    async def close(self) -> None:
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            self._flush()
        self.writer.close()
