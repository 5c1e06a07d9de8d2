"""Exec and attach over either upgrade protocol: the stream set, and the relay to a session.

SPDY (k8s.io/apimachinery httpstream/spdy, kubelet remotecommand): the client
opens one stream per role, named by its `streamType` header: error, stdin,
stdout, stderr, resize. Resize carries a sequence of JSON objects
{"Width", "Height"}. The error stream gets the final status.

WebSocket (wsstream): every message starts with its channel byte: 0 stdin,
1 stdout, 2 stderr, 3 error, 4 resize; `v5.channel.k8s.io` adds 255, the
close signal ([255, channel]: the client will send no more on that channel).
The base64 variants send text messages: the channel as an ASCII digit, then
base64 data.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import structlog

from services.frontend.streaming import status
from services.frontend.streaming.backend import Output, ProcessSession, cancel_quietly
from services.frontend.streaming.spdy_session import SpdyConnection, SpdyStream, StreamReset
from services.frontend.streaming.websocket import WebSocket, WebSocketClosed

log = structlog.get_logger(__name__)

SPDY_PROTOCOLS = ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
WEBSOCKET_PROTOCOLS = ["v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                       "channel.k8s.io", "base64.channel.k8s.io", ""]
STREAM_CREATION_TIMEOUT = 30.0

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
CLOSE_SIGNAL = 255
_MAX_RESIZE_JSON = 4096


@dataclass
class Options:
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


class Writer:
    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


@dataclass
class StreamSet:
    """The client's side of one exec/attach, whatever the protocol."""

    stdin: Any = None  # object with `async read() -> bytes` (b"" = end)
    stdout: Writer | None = None
    stderr: Writer | None = None
    error: Writer | None = None
    resize: Any = None  # async iterator of (width, height)
    json_status: bool = True
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None  # sets client_gone when the connection ends


# -- SPDY -------------------------------------------------------------------


class _SpdyWriter(Writer):
    def __init__(self, stream: SpdyStream) -> None:
        self.stream = stream

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    async def close(self) -> None:
        await self.stream.close()


async def _json_sizes(read: Any) -> AsyncIterator[tuple[int, int]]:
    """Terminal sizes from a byte stream of concatenated JSON objects."""
    decoder = json.JSONDecoder()
    buffer = ""
    while True:
        chunk = await read()
        if not chunk:
            return
        buffer += chunk.decode(errors="replace")
        while True:
            text = buffer.lstrip()
            if not text:
                buffer = ""
                break
            try:
                obj, end = decoder.raw_decode(text)
            except ValueError:
                if len(text) > _MAX_RESIZE_JSON:
                    return  # garbage, not a size that is still arriving
                buffer = text
                break
            buffer = text[end:]
            size = _size(obj)
            if size is not None:
                yield size


def _size(obj: Any) -> tuple[int, int] | None:
    if not isinstance(obj, dict):
        return None
    width, height = obj.get("Width", obj.get("width")), obj.get("Height", obj.get("height"))
    if not isinstance(width, int) or not isinstance(height, int):
        return None
    if not (0 <= width <= 0xFFFF and 0 <= height <= 0xFFFF):
        return None
    return width, height


async def spdy_streams(conn: SpdyConnection, protocol: str, opts: Options,
                       timeout: float = STREAM_CREATION_TIMEOUT) -> StreamSet:
    """Wait for the streams the client must open, and reply to each."""
    expected = {"error"}
    if opts.stdin:
        expected.add("stdin")
    if opts.stdout:
        expected.add("stdout")
    if opts.stderr and not opts.tty:
        expected.add("stderr")
    if opts.tty and protocol != "channel.k8s.io" and protocol != "v2.channel.k8s.io":
        expected.add("resize")
    got: dict[str, SpdyStream] = {}

    async def gather() -> None:
        while not expected.issubset(got):
            stream = await conn.accept()
            if stream is None:
                raise ConnectionError("the client closed the connection while opening streams")
            kind = stream.header("streamtype")
            if kind not in ("error", "stdin", "stdout", "stderr", "resize") or kind in got:
                stream.reply(reject=True)
                stream.cancel()
                continue
            stream.reply()
            got[kind] = stream

    try:
        await asyncio.wait_for(gather(), timeout)
    except asyncio.TimeoutError:
        raise ConnectionError(f"timed out waiting for the client's streams ({sorted(expected - set(got))})") \
            from None
    streams = StreamSet(json_status=protocol == "v4.channel.k8s.io")
    if "stdin" in got:
        streams.stdin = got["stdin"]
    if "stdout" in got:
        streams.stdout = _SpdyWriter(got["stdout"])
    if "stderr" in got:
        streams.stderr = _SpdyWriter(got["stderr"])
    streams.error = _SpdyWriter(got["error"])
    if "resize" in got:
        streams.resize = _json_sizes(got["resize"].read)

    async def watch() -> None:
        await conn.done.wait()
        streams.client_gone.set()

    streams.watcher = asyncio.create_task(watch())
    return streams


# -- WebSocket ----------------------------------------------------------------


class _WsWriter(Writer):
    def __init__(self, ws: WebSocket, channel: int, text: bool) -> None:
        self.ws = ws
        self.channel = channel
        self.text = text

    async def write(self, data: bytes) -> None:
        if self.text:
            await self.ws.send(str(self.channel).encode() + base64.b64encode(data), text=True)
        else:
            await self.ws.send(bytes([self.channel]) + data)


class _Queue:
    """A bounded queue of stdin chunks: the socket is not read while it is full."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[bytes] = asyncio.Queue(16)
        self.ended = False

    async def read(self) -> bytes:
        if self.ended and self.q.empty():
            return b""
        data = await self.q.get()
        if not data:
            self.ended = True
        return data

    async def end(self) -> None:
        if not self.ended:
            self.ended = True
            await self.q.put(b"")


class WsDemux:
    """Reads a channel WebSocket and sorts its messages."""

    def __init__(self, ws: WebSocket, channels: int) -> None:
        self.ws = ws
        self.text = ws.subprotocol is not None and "base64" in ws.subprotocol
        self.v5 = ws.subprotocol == "v5.channel.k8s.io"
        self.inputs = {ch: _Queue() for ch in range(channels)}
        self.closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ws-demux")

    async def _run(self) -> None:
        try:
            while True:
                message = await self.ws.recv()
                if message is None:
                    break
                if isinstance(message, str):
                    if not self.text or not message:
                        continue
                    channel = ord(message[0]) - ord("0")
                    try:
                        data = base64.b64decode(message[1:])
                    except ValueError:
                        continue
                else:
                    if not message:
                        continue
                    channel, data = message[0], message[1:]
                if channel == CLOSE_SIGNAL and self.v5:
                    if data and data[0] in self.inputs:
                        await self.inputs[data[0]].end()
                    continue
                queue = self.inputs.get(channel)
                if queue is not None and data and not queue.ended:
                    await queue.q.put(bytes(data))
        except (ConnectionError, OSError):
            pass
        finally:
            for queue in self.inputs.values():
                if not queue.ended:
                    queue.ended = True
                    try:
                        queue.q.put_nowait(b"")
                    except asyncio.QueueFull:
                        pass
            self.closed.set()

    async def stop(self) -> None:
        await cancel_quietly(self._task)

    def writer(self, channel: int) -> Writer:
        return _WsWriter(self.ws, channel, self.text)


async def websocket_streams(ws: WebSocket, opts: Options) -> tuple[StreamSet, WsDemux]:
    demux = WsDemux(ws, 5)
    demux.start()
    streams = StreamSet(json_status=ws.subprotocol not in ("channel.k8s.io", "base64.channel.k8s.io", None, ""))
    if opts.stdin:
        streams.stdin = demux.inputs[STDIN]
    if opts.stdout:
        streams.stdout = demux.writer(STDOUT)
    if opts.stderr and not opts.tty:
        streams.stderr = demux.writer(STDERR)
    streams.error = demux.writer(ERROR)
    if opts.tty:
        streams.resize = _json_sizes(demux.inputs[RESIZE].read)

    async def watch() -> None:
        await demux.closed.wait()
        streams.client_gone.set()

    streams.watcher = asyncio.create_task(watch())
    # The kubelet's first message: an empty one on the lowest writable channel.
    first = streams.stdout or streams.stderr or streams.error
    await first.write(b"")
    return streams, demux


# -- the relay ----------------------------------------------------------------


async def relay(session: ProcessSession, streams: StreamSet, *, cmd: list[str] | None) -> None:
    """Copy bytes both ways until the process ends (then report its status) or the client goes."""

    async def pump_stdin() -> None:
        assert streams.stdin is not None
        while True:
            data = await streams.stdin.read()
            if not data:
                break
            await session.write(data)
        await session.close_stdin()

    async def pump_resize() -> None:
        async for width, height in streams.resize:
            await session.resize(width, height)

    async def pump_output() -> Output:
        while True:
            out = await session.read()
            if out.stdout and streams.stdout is not None:
                await streams.stdout.write(out.stdout)
            if out.stderr and streams.stderr is not None:
                await streams.stderr.write(out.stderr)
            if out.done:
                return out

    helpers = []
    if streams.stdin is not None:
        helpers.append(asyncio.create_task(pump_stdin(), name="stdin"))
    if streams.resize is not None:
        helpers.append(asyncio.create_task(pump_resize(), name="resize"))
    output = asyncio.create_task(pump_output(), name="output")
    gone = asyncio.create_task(streams.client_gone.wait(), name="client-gone")
    try:
        pending = {output, gone, *helpers}
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if output in done or gone in done:
                break
            for task in done:  # a helper ended: fine when it ended cleanly
                if not task.cancelled() and task.exception() is not None:
                    error = task.exception()
                    if not isinstance(error, (StreamReset, WebSocketClosed, ConnectionError)):
                        log.info("stream_helper_failed", task=task.get_name(), error=str(error))
        log.debug("stream_relay_ended", client_gone=gone in done, process_ended=output in done)
        if output in done and output.exception() is None:
            result = output.result()
            if result.error:
                final = status.internal_error(result.error)
            elif cmd is not None and result.exit_code not in (None, 0):
                final = status.exit_code(cmd, int(result.exit_code))
            else:
                final = status.success()
            await finish(streams, final)
        elif output in done:
            error = output.exception()
            if not isinstance(error, (StreamReset, WebSocketClosed, ConnectionError)):
                log.info("stream_output_failed", error=str(error))
                try:
                    await finish(streams, status.internal_error(str(error)))
                except (StreamReset, WebSocketClosed, ConnectionError):
                    pass
    finally:
        await cancel_quietly(output, gone, *helpers, streams.watcher)
        await session.close()


async def finish(streams: StreamSet, final: dict[str, Any]) -> None:
    try:
        for writer in (streams.stdout, streams.stderr):
            if writer is not None:
                await writer.close()
        if streams.error is not None:
            payload = status.encode(final, json_status=streams.json_status)
            if payload:
                await streams.error.write(payload)
            await streams.error.close()
    except (StreamReset, WebSocketClosed, ConnectionError):
        pass
