"""A SPDY/3.1 connection (server side) over a byte stream: streams, pings, flow control.

The peer opens streams (SYN_STREAM); `accept()` hands them out in order. A
stream's data is buffered up to a bound; past it the connection stops reading
from the socket (the peer then feels TCP back-pressure), as Go's spdystream
does. Receive windows are reopened with WINDOW_UPDATE as the application
consumes data. Send windows are honoured once the peer shows it does flow
control (it sends WINDOW_UPDATE or an initial window setting); the kubelet's
and kubectl's spdystream never do, and never send WINDOW_UPDATE either, so a
strict sender would stall them after 64 KiB.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog

from services.frontend.streaming import spdy_frames as f

log = structlog.get_logger(__name__)

# Bytes of one stream's unread data after which the connection stops reading.
STREAM_BUFFER_LIMIT = 256 * 1024
# Streams the peer may open that nobody has accepted yet.
PENDING_STREAMS = 64
MAX_STREAMS = 1024
WRITE_CHUNK = 32 * 1024


class ByteTransport(Protocol):
    """What SPDY runs over: a TCP connection, or a WebSocket carrying a tunnel."""

    async def read(self) -> bytes: ...  # b"" at end of stream

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


class StreamTransport:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        try:
            return await self.reader.read(65536)
        except (ConnectionError, OSError):
            return b""

    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()


class StreamReset(ConnectionError):
    """The stream was reset by the peer or the connection went away."""


class SpdyStream:
    def __init__(self, conn: "SpdyConnection", stream_id: int, headers: f.Headers) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._data_ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self.remote_closed = False  # peer sent FIN
        self.local_closed = False  # we sent FIN
        self.reset = False
        self.send_window = conn.initial_send_window
        self._window_open = asyncio.Event()
        self._window_open.set()
        self._unacked = 0  # consumed bytes not yet announced with WINDOW_UPDATE

    def header(self, name: str, default: str = "") -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else default

    # -- receiving --------------------------------------------------------

    def _deliver(self, data: bytes, fin: bool) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered >= STREAM_BUFFER_LIMIT:
                self._drained.clear()
        if fin:
            self.remote_closed = True
        self._data_ready.set()

    def _abort(self) -> None:
        self.reset = True
        self.remote_closed = True
        self._data_ready.set()
        self._drained.set()
        self._window_open.set()

    async def read(self) -> bytes:
        """The next chunk of data; b"" once the peer closed its side (or reset the stream)."""
        while not self._chunks:
            if self.remote_closed:
                return b""
            self._data_ready.clear()
            await self._data_ready.wait()
        data = self._chunks.pop(0)
        self._buffered -= len(data)
        if self._buffered < STREAM_BUFFER_LIMIT:
            self._drained.set()
        self._unacked += len(data)
        if self._unacked >= f.DEFAULT_WINDOW // 2 and not self.remote_closed:
            self.conn._send(f.encode_window_update(self.id, self._unacked))
            self.conn._send(f.encode_window_update(0, self._unacked))
            self._unacked = 0
        return data

    # -- sending ----------------------------------------------------------

    def reply(self, *, reject: bool = False) -> None:
        self.conn._send(f.encode_syn_reply(self.conn.compressor, self.id, {},
                                           flags=f.FLAG_FIN if reject else 0))
        if reject:
            self.local_closed = True

    async def write(self, data: bytes) -> None:
        if self.reset:
            raise StreamReset(f"stream {self.id} was reset")
        if self.local_closed:
            raise StreamReset(f"stream {self.id} is closed for writing")
        view = memoryview(data)
        while view:
            size = min(len(view), WRITE_CHUNK)
            if self.conn.flow_control:
                while self.send_window <= 0 or self.conn.send_window <= 0:
                    self._window_open.clear()
                    await self._window_open.wait()
                    if self.reset:
                        raise StreamReset(f"stream {self.id} was reset")
                size = min(size, self.send_window, self.conn.send_window)
                self.send_window -= size
                self.conn.send_window -= size
            self.conn._send(f.encode_data(self.id, bytes(view[:size])))
            view = view[size:]
            await self.conn.drain()

    async def close(self) -> None:
        """Half-close: we send no more data (FIN)."""
        if self.local_closed or self.reset or self.conn.closed:
            return
        self.local_closed = True
        self.conn._send(f.encode_data(self.id, b"", f.FLAG_FIN))
        await self.conn.drain()
        self.conn._maybe_forget(self)

    def cancel(self) -> None:
        if not self.reset and not self.conn.closed:
            self.conn._send(f.encode_rst_stream(self.id, f.CANCEL))
        self._abort()
        self.conn._forget(self)


class SpdyConnection:
    def __init__(self, transport: ByteTransport) -> None:
        self.transport = transport
        self.compressor = f.HeaderCompressor()
        self.decoder = f.FrameDecoder()
        self.streams: dict[int, SpdyStream] = {}
        self._incoming: asyncio.Queue[SpdyStream | None] = asyncio.Queue(PENDING_STREAMS)
        self.flow_control = False
        self.initial_send_window = f.DEFAULT_WINDOW
        self.send_window = f.DEFAULT_WINDOW
        self.closed = False
        self.done = asyncio.Event()
        self._last_stream_id = 0
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read_loop(), name="spdy-reader")

    async def accept(self) -> SpdyStream | None:
        """The next stream the peer opened; None when the connection is over."""
        if self.closed and self._incoming.empty():
            return None
        return await self._incoming.get()

    def _send(self, frame: bytes) -> None:
        if not self.closed:
            self.transport.write(frame)

    async def drain(self) -> None:
        if self.closed:
            raise StreamReset("connection closed")
        try:
            await self.transport.drain()
        except (ConnectionError, OSError) as e:
            raise StreamReset(str(e)) from None

    def _forget(self, stream: SpdyStream) -> None:
        self.streams.pop(stream.id, None)

    def _maybe_forget(self, stream: SpdyStream) -> None:
        if stream.local_closed and stream.remote_closed and not stream._chunks:
            self._forget(stream)

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.transport.read()
                if not data:
                    break
                for frame in self.decoder.feed(data):
                    await self._handle(frame)
        except f.ProtocolError as e:
            log.info("spdy_protocol_error", error=str(e))
            self._send(f.encode_goaway(self._last_stream_id, 1))
        except asyncio.CancelledError:
            pass
        except Exception:  # a broken peer must not crash the server
            log.exception("spdy_connection_failed")
        finally:
            self._shutdown()

    async def _handle(self, frame: f.Frame) -> None:
        if isinstance(frame, f.DataFrame):
            stream = self.streams.get(frame.stream_id)
            if stream is None:
                return  # data for a stream already gone: ignore, as spdystream does
            stream._deliver(frame.data, frame.fin)
            if not stream._drained.is_set():
                await stream._drained.wait()
            if frame.fin:
                self._maybe_forget(stream)
            return
        t = frame.type
        if t == f.SYN_STREAM:
            await self._open(frame)
        elif t == f.RST_STREAM:
            stream = self.streams.pop(frame.stream_id, None)
            if stream is not None:
                stream._abort()
        elif t == f.PING:
            if frame.ping_id % 2 == 1:  # client-initiated: echo it
                self._send(f.encode_ping(frame.ping_id))
        elif t == f.SETTINGS:
            window = frame.settings.get(f.SETTINGS_INITIAL_WINDOW_SIZE)
            if window is not None:
                self.flow_control = True
                delta = window - self.initial_send_window
                self.initial_send_window = window
                for stream in self.streams.values():
                    stream.send_window += delta
                    stream._window_open.set()
        elif t == f.WINDOW_UPDATE:
            self.flow_control = True
            if frame.stream_id == 0:
                self.send_window += frame.delta
                for stream in self.streams.values():
                    stream._window_open.set()
            else:
                stream = self.streams.get(frame.stream_id)
                if stream is not None:
                    stream.send_window += frame.delta
                    stream._window_open.set()
        elif t == f.GOAWAY:
            log.debug("spdy_goaway", last_good_id=frame.last_good_id, status=frame.status)
        elif t == f.HEADERS:
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                for name, values in frame.headers.items():
                    stream.headers.setdefault(name, []).extend(values)
                if frame.fin:
                    stream._deliver(b"", True)

    async def _open(self, frame: f.ControlFrame) -> None:
        sid = frame.stream_id
        if sid == 0 or sid % 2 == 0 or sid <= self._last_stream_id:
            self._send(f.encode_rst_stream(sid, f.PROTOCOL_ERROR))
            return
        self._last_stream_id = sid
        if len(self.streams) >= MAX_STREAMS or self._incoming.full():
            self._send(f.encode_rst_stream(sid, f.REFUSED_STREAM))
            return
        stream = SpdyStream(self, sid, frame.headers)
        if frame.fin:
            stream.remote_closed = True
        self.streams[sid] = stream
        self._incoming.put_nowait(stream)

    def _shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in list(self.streams.values()):
            stream._abort()
        self.streams.clear()
        while True:
            try:
                self._incoming.put_nowait(None)
                break
            except asyncio.QueueFull:
                self._incoming.get_nowait()
        self.done.set()

    async def close(self) -> None:
        """Say goodbye and close the transport."""
        if not self.closed:
            self._send(f.encode_goaway(self._last_stream_id, 0))
            try:
                await asyncio.wait_for(self.transport.drain(), 5)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass
        await self.transport.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._shutdown()
