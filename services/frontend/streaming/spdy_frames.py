"""SPDY/3.1 frames: encoding, decoding and the zlib-compressed header blocks.

Wire format (draft-mbelshe-httpbis-spdy-00, "SPDY Protocol - Draft 3.1"):

    control frame: |1| version(15) | type(16) | flags(8) | length(24) | data
    data frame:    |0| stream id(31)           | flags(8) | length(24) | data

Header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are a count of name/value
pairs, each length-prefixed (32 bits), multiple values of one name joined by
NUL; the block is compressed with zlib, primed with the SPDY/3 dictionary, and
one compression context lives for the whole connection in each direction.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7
STREAM_IN_USE = 8
STREAM_ALREADY_CLOSED = 9
FRAME_TOO_LARGE = 11

# SETTINGS ids
SETTINGS_MAX_CONCURRENT_STREAMS = 4
SETTINGS_INITIAL_WINDOW_SIZE = 7

DEFAULT_WINDOW = 64 * 1024
MAX_FRAME_LENGTH = (1 << 24) - 1
# Largest frame this implementation accepts; real peers send far smaller ones.
MAX_ACCEPTED_LENGTH = 1 << 20
# A decompressed header block larger than this is an attack, not a stream.
MAX_HEADER_BLOCK = 256 * 1024

_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language "
    "accept-ranges age allow authorization cache-control connection content-base content-encoding "
    "content-language content-length content-location content-md5 content-range content-type date etag "
    "expect expires from host if-match if-modified-since if-none-match if-range if-unmodified-since "
    "last-modified location max-forwards pragma proxy-authenticate proxy-authorization range referer "
    "retry-after server te trailer transfer-encoding upgrade user-agent vary via warning www-authenticate "
    "method get status"
).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
# The SPDY/3 header dictionary (1423 bytes, adler32 0xe3c6a7c2).
DICTIONARY = b"".join(len(w).to_bytes(4, "big") + w.encode() for w in _WORDS) + _TAIL.encode()


class ProtocolError(Exception):
    """The peer broke the framing; the connection cannot go on."""


Headers = dict[str, list[str]]


@dataclass
class DataFrame:
    stream_id: int
    data: bytes
    flags: int = 0

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


@dataclass
class ControlFrame:
    type: int
    flags: int = 0
    stream_id: int = 0
    associated_id: int = 0
    priority: int = 0
    headers: Headers = field(default_factory=dict)
    status: int = 0  # RST_STREAM / GOAWAY
    ping_id: int = 0
    delta: int = 0  # WINDOW_UPDATE
    last_good_id: int = 0  # GOAWAY
    settings: dict[int, int] = field(default_factory=dict)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


Frame = DataFrame | ControlFrame


class HeaderCompressor:
    """One direction's header compression context."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(level=zlib.Z_DEFAULT_COMPRESSION, zdict=DICTIONARY)

    def compress(self, headers: Headers) -> bytes:
        parts = [struct.pack(">I", len(headers))]
        for name, values in headers.items():
            key = name.lower().encode()
            value = "\0".join(values).encode()
            parts += [struct.pack(">I", len(key)), key, struct.pack(">I", len(value)), value]
        raw = b"".join(parts)
        return self._z.compress(raw) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """One direction's header decompression context."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(zdict=DICTIONARY)

    def decompress(self, block: bytes) -> Headers:
        try:
            raw = self._z.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as e:
            raise ProtocolError(f"bad compressed header block: {e}") from None
        if self._z.unconsumed_tail:
            raise ProtocolError("header block too large")
        return parse_header_block(raw)


def parse_header_block(raw: bytes) -> Headers:
    if len(raw) < 4:
        raise ProtocolError("truncated header block")
    (count,) = struct.unpack_from(">I", raw, 0)
    pos = 4
    headers: Headers = {}

    def take() -> bytes:
        nonlocal pos
        if pos + 4 > len(raw):
            raise ProtocolError("truncated header block")
        (n,) = struct.unpack_from(">I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError("truncated header block")
        value = raw[pos:pos + n]
        pos += n
        return value

    for _ in range(count):
        name = take().decode(errors="replace").lower()
        value = take().decode(errors="replace")
        if not name:
            raise ProtocolError("empty header name")
        headers.setdefault(name, []).extend(value.split("\0"))
    return headers


def _control_head(type_: int, flags: int, length: int) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, type_, (flags << 24) | length)


def encode_data(stream_id: int, data: bytes, flags: int = 0) -> bytes:
    if len(data) > MAX_FRAME_LENGTH:
        raise ValueError("data frame too long")
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(data)) + data


def encode_syn_stream(compressor: HeaderCompressor, stream_id: int, headers: Headers, *,
                      flags: int = 0, associated_id: int = 0, priority: int = 0) -> bytes:
    block = compressor.compress(headers)
    body = struct.pack(">IIBB", stream_id & 0x7FFFFFFF, associated_id & 0x7FFFFFFF,
                       (priority & 0x7) << 5, 0) + block
    return _control_head(SYN_STREAM, flags, len(body)) + body


def encode_syn_reply(compressor: HeaderCompressor, stream_id: int, headers: Headers, *, flags: int = 0) -> bytes:
    body = struct.pack(">I", stream_id & 0x7FFFFFFF) + compressor.compress(headers)
    return _control_head(SYN_REPLY, flags, len(body)) + body


def encode_headers(compressor: HeaderCompressor, stream_id: int, headers: Headers, *, flags: int = 0) -> bytes:
    body = struct.pack(">I", stream_id & 0x7FFFFFFF) + compressor.compress(headers)
    return _control_head(HEADERS, flags, len(body)) + body


def encode_rst_stream(stream_id: int, status: int) -> bytes:
    return _control_head(RST_STREAM, 0, 8) + struct.pack(">II", stream_id & 0x7FFFFFFF, status)


def encode_settings(settings: dict[int, int], flags: int = 0) -> bytes:
    body = struct.pack(">I", len(settings)) + b"".join(
        struct.pack(">II", key & 0xFFFFFF, value) for key, value in settings.items())
    return _control_head(SETTINGS, flags, len(body)) + body


def encode_ping(ping_id: int) -> bytes:
    return _control_head(PING, 0, 4) + struct.pack(">I", ping_id)


def encode_goaway(last_good_id: int, status: int = 0) -> bytes:
    return _control_head(GOAWAY, 0, 8) + struct.pack(">II", last_good_id & 0x7FFFFFFF, status)


def encode_window_update(stream_id: int, delta: int) -> bytes:
    return _control_head(WINDOW_UPDATE, 0, 8) + struct.pack(">II", stream_id & 0x7FFFFFFF, delta & 0x7FFFFFFF)


class FrameDecoder:
    """Incremental decoder: feed bytes, take whole frames (headers decompressed in order)."""

    def __init__(self, max_length: int = MAX_ACCEPTED_LENGTH) -> None:
        self._buffer = bytearray()
        self._decompressor = HeaderDecompressor()
        self.max_length = max_length

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= 8:
            first, second = struct.unpack_from(">II", self._buffer, 0)
            length = second & 0xFFFFFF
            if length > self.max_length:
                raise ProtocolError(f"frame of {length} bytes is larger than {self.max_length}")
            if len(self._buffer) < 8 + length:
                break
            body = bytes(self._buffer[8:8 + length])
            del self._buffer[:8 + length]
            flags = second >> 24
            if first & 0x80000000:
                frame = self._control(first, flags, body)
                if frame is not None:
                    frames.append(frame)
            else:
                frames.append(DataFrame(first & 0x7FFFFFFF, body, flags))
        return frames

    def _control(self, first: int, flags: int, body: bytes) -> ControlFrame | None:
        version = (first >> 16) & 0x7FFF
        type_ = first & 0xFFFF
        if version != VERSION:
            raise ProtocolError(f"unsupported SPDY version {version}")

        def need(n: int) -> None:
            if len(body) < n:
                raise ProtocolError(f"control frame type {type_} too short")

        if type_ == SYN_STREAM:
            need(10)
            sid, assoc, pri, _slot = struct.unpack_from(">IIBB", body, 0)
            headers = self._decompressor.decompress(body[10:])
            return ControlFrame(SYN_STREAM, flags, stream_id=sid & 0x7FFFFFFF, associated_id=assoc & 0x7FFFFFFF,
                                priority=pri >> 5, headers=headers)
        if type_ in (SYN_REPLY, HEADERS):
            need(4)
            (sid,) = struct.unpack_from(">I", body, 0)
            headers = self._decompressor.decompress(body[4:]) if len(body) > 4 else {}
            return ControlFrame(type_, flags, stream_id=sid & 0x7FFFFFFF, headers=headers)
        if type_ == RST_STREAM:
            need(8)
            sid, status = struct.unpack_from(">II", body, 0)
            return ControlFrame(RST_STREAM, flags, stream_id=sid & 0x7FFFFFFF, status=status)
        if type_ == SETTINGS:
            need(4)
            (count,) = struct.unpack_from(">I", body, 0)
            need(4 + 8 * count)
            settings = {}
            for i in range(count):
                key, value = struct.unpack_from(">II", body, 4 + 8 * i)
                settings[key & 0xFFFFFF] = value
            return ControlFrame(SETTINGS, flags, settings=settings)
        if type_ == PING:
            need(4)
            return ControlFrame(PING, flags, ping_id=struct.unpack_from(">I", body, 0)[0])
        if type_ == GOAWAY:
            need(4)
            (last,) = struct.unpack_from(">I", body, 0)
            status = struct.unpack_from(">I", body, 4)[0] if len(body) >= 8 else 0
            return ControlFrame(GOAWAY, flags, last_good_id=last & 0x7FFFFFFF, status=status)
        if type_ == WINDOW_UPDATE:
            need(8)
            sid, delta = struct.unpack_from(">II", body, 0)
            return ControlFrame(WINDOW_UPDATE, flags, stream_id=sid & 0x7FFFFFFF, delta=delta & 0x7FFFFFFF)
        return None  # unknown control frames are ignored, as the protocol says
