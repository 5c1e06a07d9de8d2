"""Port forwarding over either upgrade protocol.

SPDY (`portforward.k8s.io`): for every connection the client opens two
streams with the same `requestID` header, `streamType` error and data, and a
`port` header. Bytes on the data stream go to that port in the pod; a failure
is written as text on the error stream.

SPDY tunnelled in a WebSocket (KEP-4006, client-go's tunneling dialer):
subprotocol `SPDY/3.1+portforward.k8s.io` (or `v2.portforward.k8s.io`, the
name of its first version), answered with the same name; the binary messages
then carry the SPDY session's bytes, with no HTTP upgrade inside.

WebSocket channels (`v4.channel.k8s.io` and the older names): the ports come
from the URL (`?port=80&port=8080`); port i has data channel 2i and error
channel 2i+1, and the server first writes the port (2 bytes, little endian)
on both.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import structlog

from services.frontend.streaming.backend import Backend, Connection, cancel_quietly
from services.frontend.streaming.remotecommand import WsDemux
from services.frontend.streaming.spdy_session import SpdyConnection, SpdyStream, StreamReset
from services.frontend.streaming.websocket import WebSocket, WebSocketClosed
from shared.errors import CriopyError

log = structlog.get_logger(__name__)

SPDY_PROTOCOLS = ["portforward.k8s.io"]
TUNNEL_PROTOCOLS = ["SPDY/3.1+portforward.k8s.io", "v2.portforward.k8s.io"]
WEBSOCKET_PROTOCOLS = ["v4.channel.k8s.io", "v4.base64.channel.k8s.io", "channel.k8s.io",
                       "base64.channel.k8s.io", ""]
PAIR_TIMEOUT = 30.0
MAX_PORTS = 64
_BROKEN = (StreamReset, WebSocketClosed, ConnectionError, OSError)


def parse_port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return port


async def _pipe_in(read: Any, conn: Connection) -> None:
    """Client -> pod, then half-close the pod side."""
    while True:
        data = await read()
        if not data:
            break
        await conn.write(data)
    await conn.close_write()


async def _pipe_out(conn: Connection, write: Any) -> None:
    while True:
        data = await conn.read()
        if not data:
            return
        await write(data)


async def relay(conn: Connection, read: Any, write: Any) -> None:
    """Both directions until the pod side ends (the client's end alone only half-closes)."""
    inbound = asyncio.create_task(_pipe_in(read, conn))
    try:
        await _pipe_out(conn, write)
    finally:
        await cancel_quietly(inbound)


def _legacy_request_id(stream: SpdyStream, kind: str) -> str:
    """Clients too old to send requestID open error then data, on consecutive stream ids."""
    return str(stream.id - 2 if kind == "data" else stream.id)


class SpdyPortForward:
    def __init__(self, conn: SpdyConnection, backend: Backend, pod_id: str, host_network: bool) -> None:
        self.conn = conn
        self.backend = backend
        self.pod_id = pod_id
        self.host_network = host_network
        self._pairs: dict[str, dict[str, SpdyStream]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        try:
            while True:
                stream = await self.conn.accept()
                if stream is None:
                    break
                kind = stream.header("streamtype")
                request_id = stream.header("requestid") or _legacy_request_id(stream, kind)
                if kind not in ("data", "error"):
                    stream.reply(reject=True)
                    stream.cancel()
                    continue
                stream.reply()
                pair = self._pairs.setdefault(request_id, {})
                if kind in pair:
                    stream.cancel()
                    continue
                pair[kind] = stream
                if len(pair) == 1:
                    self._spawn(self._expire(request_id))
                if len(pair) == 2:
                    del self._pairs[request_id]
                    self._spawn(self._forward(pair["data"], pair["error"]))
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire(self, request_id: str) -> None:
        await asyncio.sleep(PAIR_TIMEOUT)
        pair = self._pairs.pop(request_id, None)
        if pair:
            for stream in pair.values():
                stream.cancel()

    async def _forward(self, data: SpdyStream, error: SpdyStream) -> None:
        port_text = data.header("port")
        conn: Connection | None = None
        try:
            try:
                port = parse_port(port_text)
                conn = await self.backend.port_forward(self.pod_id, port, host_network=self.host_network)
                await relay(conn, data.read, data.write)
            except (ValueError, CriopyError, ConnectionRefusedError) as e:
                message = e.message if isinstance(e, CriopyError) else str(e)
                text = f"error forwarding port {port_text} to pod {self.pod_id}: {message}"
                log.info("port_forward_failed", pod_id=self.pod_id, port=port_text, error=message)
                await error.write(text.encode())
        except _BROKEN:
            pass
        finally:
            if conn is not None:
                await conn.close()
            for stream in (data, error):
                try:
                    await stream.close()
                except _BROKEN:
                    pass


async def websocket_port_forward(ws: WebSocket, backend: Backend, pod_id: str, ports: list[int],
                                 host_network: bool) -> None:
    demux = WsDemux(ws, 2 * len(ports))
    demux.start()
    try:
        for i, port in enumerate(ports):
            prefix = struct.pack("<H", port)
            await demux.writer(2 * i).write(prefix)
            await demux.writer(2 * i + 1).write(prefix)

        async def one(i: int, port: int) -> None:
            conn: Connection | None = None
            try:
                try:
                    conn = await backend.port_forward(pod_id, port, host_network=host_network)
                    await relay(conn, demux.inputs[2 * i].read, demux.writer(2 * i).write)
                except (CriopyError, ConnectionRefusedError) as e:
                    message = e.message if isinstance(e, CriopyError) else str(e)
                    await demux.writer(2 * i + 1).write(
                        f"error forwarding port {port} to pod {pod_id}: {message}".encode())
            except _BROKEN:
                pass
            finally:
                if conn is not None:
                    await conn.close()

        forwards = asyncio.gather(*(one(i, p) for i, p in enumerate(ports)))
        closed = asyncio.create_task(demux.closed.wait())
        await asyncio.wait({forwards, closed}, return_when=asyncio.FIRST_COMPLETED)
        await cancel_quietly(forwards, closed)  # type: ignore[arg-type]
    finally:
        await demux.stop()
