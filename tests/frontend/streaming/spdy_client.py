"""A small SPDY/3.1 client for tests, written from the SPDY/3.1 draft and the kubelet's protocol docs.

It shares no code with the server: its own framing, its own copy of the
header dictionary (built from the draft's list), its own zlib contexts.
It behaves like Go's spdystream (no flow control of its own) unless
`flow_control=True`, where it sends a SETTINGS initial window and honours the
server's WINDOW_UPDATEs. It runs over any byte transport: the upgraded
connection itself (`SocketTransport`), or a WebSocket tunnel (tunnel.py).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import zlib
from typing import Protocol
from urllib.parse import urlsplit

_NAMES = ("options head post put delete trace accept accept-charset accept-encoding accept-language "
          "accept-ranges age allow authorization cache-control connection content-base content-encoding "
          "content-language content-length content-location content-md5 content-range content-type date etag "
          "expect expires from host if-match if-modified-since if-none-match if-range if-unmodified-since "
          "last-modified location max-forwards pragma proxy-authenticate proxy-authorization range referer "
          "retry-after server te trailer transfer-encoding upgrade user-agent vary via warning www-authenticate "
          "method get status").split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie",
                                           "keep-alive", "origin"]
_REST = ("100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
         "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
         "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
         "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, "
         "Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,"
         "application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch"
         "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.")
SPDY3_DICTIONARY = b"".join(struct.pack(">I", len(n)) + n.encode() for n in _NAMES) + _REST.encode()
assert zlib.adler32(SPDY3_DICTIONARY) == 0xE3C6A7C2


class UpgradeRefused(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class ByteTransport(Protocol):
    async def read(self) -> bytes: ...  # b"" at end of stream

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


class SocketTransport:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        return await self.reader.read(65536)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()


async def read_upgrade_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, str]:
    """The headers of a 101 answer; any other answer raises UpgradeRefused and closes the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    status = int(status_line.split(" ")[1])
    headers = {}
    for line in header_lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if status != 101:
        length = int(headers.get("content-length", "0"))
        body = (await reader.readexactly(length)).decode() if length else (await reader.read()).decode()
        writer.close()
        raise UpgradeRefused(status, body)
    return headers


class ClientStream:
    def __init__(self, client: "SpdyClient", sid: int, headers: dict[str, str]) -> None:
        self.client = client
        self.id = sid
        self.headers = headers
        self.replied = asyncio.Event()
        self.rejected = False
        self.data = asyncio.Queue()  # bytes chunks; b"" = FIN
        self.reset = False
        self.send_window = 65536
        self.window = asyncio.Event()
        self.window.set()

    async def write(self, payload: bytes, fin: bool = False) -> None:
        view = memoryview(payload)
        while view or fin:
            n = len(view)
            if self.client.flow_control:
                while self.send_window <= 0:
                    self.window.clear()
                    await self.window.wait()
                n = min(n, self.send_window)
                self.send_window -= n
            chunk = bytes(view[:n])
            view = view[n:]
            last = fin and not view
            self.client.send(struct.pack(">II", self.id, (1 if last else 0) << 24 | len(chunk)) + chunk)
            await self.client.transport.drain()
            if last or (not view and not fin):
                break

    async def close(self) -> None:
        await self.write(b"", fin=True)

    async def read(self, timeout: float = 30) -> bytes:
        return await asyncio.wait_for(self.data.get(), timeout)

    async def read_all(self, timeout: float = 30) -> bytes:
        out = b""
        while True:
            chunk = await self.read(timeout)
            if not chunk:
                return out
            out += chunk


class SpdyClient:
    def __init__(self, transport: ByteTransport, protocol: str, flow_control: bool = False) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self.protocol = protocol
        self.flow_control = flow_control
        self.deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, SPDY3_DICTIONARY)
        self.inflate = zlib.decompressobj(zdict=SPDY3_DICTIONARY)
        self.streams: dict[int, ClientStream] = {}
        self.next_id = 1
        self.goaway = asyncio.Event()
        self.closed = asyncio.Event()
        self.pings: list[int] = []
        self.window_updates: list[tuple[int, int]] = []
        self._task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, url: str, protocols: list[str], *, flow_control: bool = False,
                      tls: ssl.SSLContext | None = None) -> "SpdyClient":
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port, ssl=tls)
        lines = [f"POST {parts.path}{'?' + parts.query if parts.query else ''} HTTP/1.1",
                 f"Host: {parts.hostname}:{parts.port}", "Connection: Upgrade", "Upgrade: SPDY/3.1"]
        lines += [f"X-Stream-Protocol-Version: {p}" for p in protocols]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        headers = await read_upgrade_response(reader, writer)
        client = cls(SocketTransport(reader, writer), headers.get("x-stream-protocol-version", ""), flow_control)
        if flow_control:
            client.send(client._control(4, 0, struct.pack(">I", 1) + struct.pack(">II", 7, 65536)))
        return client

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    @staticmethod
    def _control(type_: int, flags: int, body: bytes) -> bytes:
        return struct.pack(">HHI", 0x8003, type_, flags << 24 | len(body)) + body

    def _header_block(self, headers: dict[str, str]) -> bytes:
        raw = struct.pack(">I", len(headers))
        for k, v in headers.items():
            raw += struct.pack(">I", len(k)) + k.lower().encode() + struct.pack(">I", len(v)) + v.encode()
        return self.deflate.compress(raw) + self.deflate.flush(zlib.Z_SYNC_FLUSH)

    async def open_stream(self, headers: dict[str, str], *, wait_reply: bool = True) -> ClientStream:
        sid = self.next_id
        self.next_id += 2
        stream = ClientStream(self, sid, headers)
        self.streams[sid] = stream
        body = struct.pack(">IIBB", sid, 0, 0, 0) + self._header_block(headers)
        self.send(self._control(1, 0, body))
        await self.transport.drain()
        if wait_reply:
            await asyncio.wait_for(stream.replied.wait(), 30)
        return stream

    async def ping(self, ping_id: int = 1) -> None:
        self.send(self._control(6, 0, struct.pack(">I", ping_id)))
        await self.transport.drain()

    def _parse_headers(self, block: bytes) -> dict[str, str]:
        raw = self.inflate.decompress(block)
        (n,) = struct.unpack_from(">I", raw, 0)
        pos, out = 4, {}
        for _ in range(n):
            (ln,) = struct.unpack_from(">I", raw, pos)
            name = raw[pos + 4:pos + 4 + ln].decode()
            pos += 4 + ln
            (lv,) = struct.unpack_from(">I", raw, pos)
            out[name] = raw[pos + 4:pos + 4 + lv].decode()
            pos += 4 + lv
        return out

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            data = await self.transport.read()
            if not data:
                raise asyncio.IncompleteReadError(bytes(self._buffer), n)
            self._buffer += data
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def _read_loop(self) -> None:
        try:
            while True:
                head = await self._read_exactly(8)
                first, second = struct.unpack(">II", head)
                length = second & 0xFFFFFF
                flags = second >> 24
                body = await self._read_exactly(length)
                if not first & 0x80000000:
                    stream = self.streams.get(first)
                    if stream is None:
                        continue
                    if body:
                        stream.data.put_nowait(body)
                    if flags & 1:
                        stream.data.put_nowait(b"")
                    continue
                type_ = first & 0xFFFF
                if type_ == 2:  # SYN_REPLY
                    (sid,) = struct.unpack_from(">I", body, 0)
                    self._parse_headers(body[4:])
                    stream = self.streams.get(sid)
                    if stream is not None:
                        stream.rejected = bool(flags & 1)
                        stream.replied.set()
                elif type_ == 3:  # RST_STREAM
                    sid, _status = struct.unpack_from(">II", body, 0)
                    stream = self.streams.get(sid)
                    if stream is not None:
                        stream.reset = True
                        stream.replied.set()
                        stream.data.put_nowait(b"")
                elif type_ == 6:
                    self.pings.append(struct.unpack_from(">I", body, 0)[0])
                elif type_ == 7:
                    self.goaway.set()
                elif type_ == 9:
                    sid, delta = struct.unpack_from(">II", body, 0)
                    self.window_updates.append((sid, delta))
                    stream = self.streams.get(sid)
                    if stream is not None:
                        stream.send_window += delta
                        stream.window.set()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            for stream in self.streams.values():
                stream.data.put_nowait(b"")
            self.closed.set()

    async def close(self) -> None:
        await self.transport.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
