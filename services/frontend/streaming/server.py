"""The streaming HTTP server: /exec/<token>, /attach/<token>, /portforward/<token>.

A CRI Exec/Attach/PortForward call stores its validated request under a
single-use token and returns this server's URL for it; the client then opens
the URL and upgrades the connection, to SPDY/3.1 (`Upgrade: SPDY/3.1`, the
protocol named by `X-Stream-Protocol-Version`) or to a WebSocket (the protocol
named by `Sec-WebSocket-Protocol`; for port-forward, that WebSocket may in
turn carry a SPDY session). An unknown, used or expired token gets
404 Not Found, as the kubelet's streaming server answers.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import structlog

from services.frontend.streaming import portforward, remotecommand, status
from services.frontend.streaming.backend import Backend
from services.frontend.streaming.http_head import BadRequest, RequestHead, read_head, response
from services.frontend.streaming.idle import (Activity, WatchedReader, WatchedWriter, close_when_idle,
                                              parse_duration)
from services.frontend.streaming.spdy_session import ByteTransport, SpdyConnection, StreamTransport
from services.frontend.streaming.tokens import TokenStore
from services.frontend.streaming.websocket import TunnelTransport, WebSocket
from shared.config import Config
from shared.errors import CriopyError, FailedPrecondition, InvalidArgument

log = structlog.get_logger(__name__)

HEAD_TIMEOUT = 15.0
KINDS = ("exec", "attach", "portforward")


class StreamingServer:
    def __init__(self, backend: Backend, *, address: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None, tokens: TokenStore | None = None,
                 idle_timeout: float = 0.0) -> None:
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.address = address
        self.port = port
        self.tls = tls
        self.tokens = tokens if tokens is not None else TokenStore()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_config(cls, config: Config, backend: Backend) -> "StreamingServer":
        api = config.crio.api
        try:
            port = int(api.stream_port or 0)
        except ValueError:
            raise InvalidArgument(f"crio.api.stream_port: not a port number: {api.stream_port!r}") from None
        try:
            idle = parse_duration(api.stream_idle_timeout)
        except ValueError:
            raise InvalidArgument(f"crio.api.stream_idle_timeout: not a duration: {api.stream_idle_timeout!r}") \
                from None
        tls = None
        if api.stream_enable_tls:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                tls.load_cert_chain(api.stream_tls_cert, api.stream_tls_key)
            except (OSError, ssl.SSLError) as e:
                raise FailedPrecondition(
                    f"streaming TLS: cannot load {api.stream_tls_cert!r} / {api.stream_tls_key!r}: {e}") from None
        return cls(backend, address=api.stream_address or "127.0.0.1", port=port, tls=tls, idle_timeout=idle)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.address, self.port, ssl=self.tls,
                                                  limit=64 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("streaming_listening", url=self.base_url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{scheme}://{host}:{self.port}"

    def url(self, kind: str, request: dict[str, Any]) -> str:
        """A single-use URL for a validated request."""
        assert kind in KINDS
        token = self.tokens.issue({"kind": kind, **request})
        return f"{self.base_url}/{kind}/{token}"

    # -- connections --------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        watchdog = None
        if self.idle_timeout > 0:
            activity = Activity()
            reader = WatchedReader(reader, activity)  # type: ignore[assignment]
            writer = WatchedWriter(writer, activity)  # type: ignore[assignment]

            def idle() -> None:
                log.info("stream_connection_idle", timeout=self.idle_timeout)
                task.cancel()

            watchdog = asyncio.create_task(close_when_idle(activity, self.idle_timeout, idle))
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError) as e:
            log.debug("stream_connection_lost", error=str(e))
        except Exception:
            log.exception("stream_connection_failed")
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self._connections.discard(task)
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, status: int, reason: str, body: str,
                     headers: list[tuple[str, str]] | None = None) -> None:
        writer.write(response(status, reason, body, headers))
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await read_head(reader, HEAD_TIMEOUT)
        except BadRequest as e:
            await self._reply(writer, 400, "Bad Request", f"{e}\n")
            return
        parts = head.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in KINDS:
            await self._reply(writer, 404, "Not Found", "404 page not found\n")
            return
        if head.method not in ("GET", "POST"):
            await self._reply(writer, 405, "Method Not Allowed", "method not allowed\n")
            return
        kind, token = parts
        request = self.tokens.consume(token)
        if request is None or request.get("kind") != kind:
            log.info("stream_token_refused", kind=kind)
            await self._reply(writer, 404, "Not Found", "404 page not found\n")
            return
        upgrade = head.upgrade()
        if upgrade == "websocket":
            await self._websocket(reader, writer, head, request)
        elif upgrade.startswith("spdy/3.1"):
            await self._spdy(reader, writer, head, request)
        else:
            await self._reply(writer, 400, "Bad Request",
                              "unable to upgrade: missing upgrade headers in request\n")

    async def _spdy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: RequestHead,
                    request: dict[str, Any]) -> None:
        supported = portforward.SPDY_PROTOCOLS if request["kind"] == "portforward" \
            else remotecommand.SPDY_PROTOCOLS
        offered = head.header_values("x-stream-protocol-version")
        if not offered:
            await self._reply(writer, 400, "Bad Request",
                              "unable to upgrade: X-Stream-Protocol-Version is required\n")
            return
        chosen = next((p for p in offered if p in supported), None)
        if chosen is None:
            await self._reply(writer, 403, "Forbidden",
                              f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                              f"server accepts {supported}\n",
                              [("X-Accepted-Stream-Protocol-Versions", p) for p in supported])
            return
        writer.write(response(101, "Switching Protocols", headers=[
            ("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", chosen)]))
        await writer.drain()
        await self._run_spdy(StreamTransport(reader, writer), chosen, request)

    async def _run_spdy(self, transport: ByteTransport, protocol: str, request: dict[str, Any]) -> None:
        """One SPDY session, over the upgraded connection itself or tunnelled in a WebSocket."""
        conn = SpdyConnection(transport)
        conn.start()
        try:
            await self._serve_spdy(conn, protocol, request)
        finally:
            await conn.close()

    async def _serve_spdy(self, conn: SpdyConnection, protocol: str, request: dict[str, Any]) -> None:
        if request["kind"] == "portforward":
            await portforward.SpdyPortForward(conn, self.backend, request["pod_id"],
                                              bool(request.get("host_network"))).serve()
            return
        opts = _options(request)
        streams = await remotecommand.spdy_streams(conn, protocol, opts)
        await self._run_command(request, opts, streams)

    async def _websocket(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: RequestHead,
                         request: dict[str, Any]) -> None:
        if request["kind"] == "portforward":
            supported = portforward.TUNNEL_PROTOCOLS + portforward.WEBSOCKET_PROTOCOLS
        else:
            supported = remotecommand.WEBSOCKET_PROTOCOLS
        ws = await WebSocket.handshake(reader, writer, head, supported)
        if ws is None:
            return
        try:
            if request["kind"] == "portforward":
                if ws.subprotocol in portforward.TUNNEL_PROTOCOLS:
                    await self._run_spdy(TunnelTransport(ws), portforward.SPDY_PROTOCOLS[0], request)
                    return
                ports = _query_ports(head) or list(request.get("ports") or [])
                if not ports or len(ports) > portforward.MAX_PORTS:
                    await ws.close(1008, "port-forward needs 1 to 64 ports in the query (?port=N)")
                    return
                await portforward.websocket_port_forward(ws, self.backend, request["pod_id"], ports,
                                                         bool(request.get("host_network")))
                return
            opts = _options(request)
            streams, demux = await remotecommand.websocket_streams(ws, opts)
            try:
                await self._run_command(request, opts, streams)
            finally:
                await demux.stop()
        finally:
            await ws.close()

    async def _run_command(self, request: dict[str, Any], opts: remotecommand.Options,
                           streams: remotecommand.StreamSet) -> None:
        try:
            if request["kind"] == "exec":
                session = await self.backend.exec(request["container_id"], list(request["cmd"]), tty=opts.tty,
                                                  stdin=opts.stdin, stdout=opts.stdout, stderr=opts.stderr)
            else:
                session = await self.backend.attach(request["container_id"], tty=opts.tty, stdin=opts.stdin,
                                                    stdout=opts.stdout, stderr=opts.stderr)
        except CriopyError as e:
            log.info("stream_session_refused", kind=request["kind"], error=e.message)
            await remotecommand.finish(streams, status.internal_error(e.message))
            return
        await remotecommand.relay(session, streams, cmd=list(request["cmd"]) if request["kind"] == "exec" else None)


def _options(request: dict[str, Any]) -> remotecommand.Options:
    return remotecommand.Options(stdin=bool(request.get("stdin")), stdout=bool(request.get("stdout")),
                                 stderr=bool(request.get("stderr")), tty=bool(request.get("tty")))


def _query_ports(head: RequestHead) -> list[int]:
    ports: list[int] = []
    for value in head.query.get("port", []):
        for text in value.split(","):
            if text.strip():
                try:
                    ports.append(portforward.parse_port(text.strip()))
                except ValueError:
                    return []
    return ports
