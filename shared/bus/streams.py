"""Byte streams between the frontend and a daemon: exec, attach and port-forward sessions.

The request/reply bus is for calls; a stream's bytes do not go over it. A
daemon that serves streams (runtimed for exec and attach, netd for
port-forward) listens on one unix stream socket of its own,
`<bus dir>/<service>/streams.sock` (mode 0660 in the daemon's directory, 0750:
only the daemon's user and group, the frontend, may connect; and the
connection's SO_PEERCRED must name the frontend, api.STREAM_CALLERS). A session is
started with an ordinary bus call (`exec_start`, `attach_start`, `pf_open`),
which does the work that may fail with a typed error (the container is not
running, the port refuses), registers the session here and answers with a
single-use token. The frontend then connects to the socket and names the
token in its first frame; from there on that connection is the session's own:

    frontend                          daemon
    connect, OPEN <token>   ------>   accept (StreamListener._accept: the one
                                      accept point, where the peer's
                                      credentials are checked)
    STDIN / STDIN_END /     ------>   the session's input; RESIZE
    RESIZE                            (width, height) for a terminal
                            <------   STDOUT / STDERR, WINDOW (more STDIN the
                                      daemon accepts), then END {exit_code,
                                      error}, the last frame
    close                             closes too

Every frame is a 5-byte header, kind (1 byte) and payload length (4 bytes,
network order), then the payload, at most MAX_FRAME bytes. Port-forward uses
STDIN and STDOUT for the two directions of its TCP connection.

Why a connection per session, and not the bus: each session's bytes pay no
request round trip and no msgpack envelope, and an open session holds none of
the daemon's request slots, so a hundred open sessions do not slow ordinary
calls. Why one listening socket, and not a socket file per session: one
accept point, one file to protect, nothing left to sweep after a crash; the
connection is already a socket of the session's own, with its own buffers and
back-pressure.

Flow control. Output: the daemon writes a frame and waits until the socket
takes it, so a frontend that stops reading (its client stopped reading)
leaves at most the socket buffers and one read chunk in flight; the daemon
then stops reading the process, whose writes block. Input: credit, as in
SPDY or HTTP/2. The frontend may send INPUT_WINDOW bytes of STDIN beyond what
the daemon has granted back with WINDOW frames; the daemon grants bytes back
as the session consumes them. So the daemon buffers at most INPUT_WINDOW
bytes of input per session, and still reads every frame as it arrives:
RESIZE, STDIN_END and the frontend's going away are seen at once even while
the process does not read its stdin.

Teardown. The session ends when its work ends (the process exits, the pod
closes its side): the daemon sends END and closes. When the frontend's
connection closes first, the daemon ends the session (kills the process,
closes the pod connection). A session no frontend claims within
CLAIM_TIMEOUT is ended as abandoned. When the daemon stops, every session is
ended and each connected frontend gets an END with an error; when the daemon
dies, the frontend sees its connection close without END and reports the
session as lost. A live session is never ended for being idle here: the
streaming server's idle timeout (crio.api.stream_idle_timeout) is about the
client, and the frontend closes the stream when it applies.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
import structlog

from shared.bus import ipc
from shared.bus.api import STREAM_CALLERS
from shared.bus.peers import refused, stream_caller
from shared.config import Config
from shared.errors import ResourceExhausted, Unavailable
from shared.identities import Callers

log = structlog.get_logger(__name__)

# Frame kinds. Frontend to daemon:
OPEN, STDIN, STDIN_END, RESIZE = 1, 2, 3, 4
# Daemon to frontend:
STDOUT, STDERR, WINDOW, END = 5, 6, 7, 8

HEADER = struct.Struct("!BI")
_SIZE = struct.Struct("!HH")
_COUNT = struct.Struct("!I")
MAX_FRAME = 256 * 1024
# Bytes read at once from what a session streams out.
READ_SIZE = 256 * 1024
# STDIN bytes a session may have received and not yet consumed.
INPUT_WINDOW = 512 * 1024
# Sessions one daemon keeps open at once (each holds a process or a connection).
MAX_STREAMS = 100
# Seconds a started session waits for its frontend.
CLAIM_TIMEOUT = 30.0
# Seconds a new connection has to name its session.
OPEN_TIMEOUT = 10.0
# Characters of an END frame's error that are kept.
MAX_ERROR = 8192


@dataclass
class End:
    """How a session ended: the process's exit code, or why it could not run to its end."""

    exit_code: int | None = None
    error: str | None = None


class ProtocolError(Exception):
    """A frame that breaks the protocol; the connection is closed."""


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def end_frame(end: End) -> bytes:
    error = end.error[:MAX_ERROR] if end.error is not None else None
    return frame(END, msgpack.packb({"exit_code": end.exit_code, "error": error}))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame; asyncio.IncompleteReadError at the end of the connection."""
    kind, size = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > MAX_FRAME:
        raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    return kind, await reader.readexactly(size) if size else b""


def _decode_end(payload: bytes) -> End:
    try:
        body = msgpack.unpackb(payload, raw=False)
        code, error = body.get("exit_code"), body.get("error")
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"END frame is not a msgpack map: {e}") from None
    if (code is not None and not isinstance(code, int)) or (error is not None and not isinstance(error, str)):
        raise ProtocolError("END frame with a malformed exit code or error")
    return End(code, error)


# -- the daemon's side -------------------------------------------------------------


class StreamSession(Protocol):
    """What a daemon streams: started by a bus call, then served on the frontend's connection."""

    kind: str

    async def start(self) -> None:
        """Start the work (run the process, connect to the port); typed errors go back to the bus call."""

    async def serve(self, stream: "DaemonStream") -> End:
        """Move bytes between the work and the stream until the work ends; cancelled if the frontend goes."""

    def resize(self, width: int, height: int) -> None:
        """The client's terminal size changed."""

    async def close(self) -> None:
        """Release everything (kill the process, close the connection); may be called more than once."""


class DaemonStream:
    """The daemon's end of one session's connection, as the session sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: StreamSession) -> None:
        self._reader = reader
        self._writer = writer
        self._session = session
        self._input: deque[bytes] = deque()
        self._input_ended = False
        self._input_ready = asyncio.Event()
        self._window = INPUT_WINDOW  # STDIN bytes the frontend may still send
        self._consumed = 0  # consumed since the last WINDOW frame

    async def send(self, kind: int, data: bytes) -> None:
        """STDOUT or STDERR bytes; returns once the connection has taken them (back-pressure)."""
        for at in range(0, len(data), MAX_FRAME):
            chunk = data[at:at + MAX_FRAME]
            self._writer.write(HEADER.pack(kind, len(chunk)) + chunk)
            await self._writer.drain()

    async def copy_output(self, reader: asyncio.StreamReader, kind: int) -> None:
        """`reader` to the stream as `kind` frames, until it ends or fails (EIO: a terminal's other
        side closed), or until the frontend goes away (the listener then ends the session)."""
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except OSError:
                return
            if not data:
                return
            try:
                await self.send(kind, data)
            except OSError:
                return

    async def receive(self) -> bytes:
        """The next STDIN bytes; b"" once the frontend ended its input."""
        while not self._input:
            if self._input_ended:
                return b""
            self._input_ready.clear()
            await self._input_ready.wait()
        data = self._input.popleft()
        self._consumed += len(data)
        if self._consumed >= INPUT_WINDOW // 4:
            self._window += self._consumed
            self._writer.write(frame(WINDOW, _COUNT.pack(self._consumed)))
            self._consumed = 0
        return data

    async def copy_input(self, writer: asyncio.StreamWriter) -> bool:
        """STDIN to `writer` until the frontend ends it (True), or until `writer` breaks (False; what
        follows is read and dropped: it has nowhere to go)."""
        try:
            while data := await self.receive():
                writer.write(data)
                await writer.drain()
            return True
        except (ConnectionError, OSError):
            while await self.receive():
                pass
            return False

    def _end_input(self) -> None:
        self._input_ended = True
        self._input_ready.set()

    async def read_frames(self) -> None:
        """Take the frontend's frames as they come; returns when it goes away or breaks the protocol."""
        try:
            while True:
                kind, payload = await read_frame(self._reader)
                if kind == STDIN:
                    if len(payload) > self._window:
                        raise ProtocolError(f"{len(payload)} bytes of input beyond the window of {self._window}")
                    self._window -= len(payload)
                    if payload and not self._input_ended:
                        self._input.append(payload)
                        self._input_ready.set()
                elif kind == STDIN_END:
                    self._end_input()
                elif kind == RESIZE and len(payload) == _SIZE.size:
                    self._resize(*_SIZE.unpack(payload))
                else:
                    raise ProtocolError(f"unexpected frame kind {kind} of {len(payload)} bytes")
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except ProtocolError as e:
            log.warning("stream_protocol_error", kind=self._session.kind, error=str(e))
        finally:
            self._end_input()

    def _resize(self, width: int, height: int) -> None:
        try:
            self._session.resize(width, height)
        except Exception as e:  # a resize that fails must not end the session
            log.info("stream_resize_failed", kind=self._session.kind, error=str(e))

    def send_end(self, end: End) -> None:
        if not self._writer.is_closing():
            self._writer.write(end_frame(end))


class StreamListener:
    """A daemon's stream socket: the sessions it started, and the connections that serve them."""

    def __init__(self, service: str, path: str | os.PathLike[str], *, config: Config | None = None,
                 max_streams: int = MAX_STREAMS, claim_timeout: float = CLAIM_TIMEOUT) -> None:
        self.service = service
        self.path = Path(path)
        # Whose credentials are the frontend's (the defaults when no configuration is given).
        self._callers = Callers(config or Config())
        self.max_streams = max_streams
        self.claim_timeout = claim_timeout
        self.sessions: dict[str, StreamSession] = {}  # by token: started, claimed or not
        self._unclaimed: dict[str, asyncio.TimerHandle] = {}
        self._starting = 0
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._closers: set[asyncio.Task[None]] = set()  # abandoned sessions being ended

    async def start(self) -> None:
        self.path.parent.mkdir(mode=ipc.DAEMON_DIR_MODE, parents=True, exist_ok=True)
        ipc.claim(self.path)  # a file left by a predecessor that was killed, never a live socket
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path), limit=MAX_FRAME)
        ipc.restrict(self.path)
        log.info("streams_listening", path=str(self.path))

    async def close(self) -> None:
        """End every session: connected frontends get an END saying the daemon stopped."""
        if self._server is not None:
            self._server.close()
        for timer in self._unclaimed.values():
            timer.cancel()
        unclaimed = [self._end(token) for token in self._unclaimed]
        self._unclaimed.clear()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*unclaimed, *self._connections, *self._closers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
            self.path.unlink(missing_ok=True)

    async def open(self, session: StreamSession) -> str:
        """Start `session` and keep it for the frontend; the token the frontend names when it connects."""
        if self._server is None:
            raise Unavailable(f"{self.service} is not serving streams")
        if len(self.sessions) + self._starting >= self.max_streams:
            raise ResourceExhausted(f"too many streaming sessions in {self.service} (max {self.max_streams})")
        self._starting += 1
        try:
            try:
                await session.start()
            except BaseException:
                await session.close()
                raise
        finally:
            self._starting -= 1
        token = secrets.token_hex(16)
        self.sessions[token] = session
        self._unclaimed[token] = asyncio.get_running_loop().call_later(self.claim_timeout, self._abandon, token)
        return token

    def _abandon(self, token: str) -> None:
        if self._unclaimed.pop(token, None) is not None:
            log.info("stream_abandoned", kind=self.sessions[token].kind, timeout=self.claim_timeout)
            closer = asyncio.create_task(self._end(token))
            self._closers.add(closer)
            closer.add_done_callback(self._closers.discard)

    async def _end(self, token: str) -> None:
        session = self.sessions.pop(token, None)
        if session is not None:
            await session.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Every connection starts here, the one place to check who connected; then read which
        session it claims, and serve it."""
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            caller = stream_caller(writer.get_extra_info("socket"), self._callers)
            if not caller.may(STREAM_CALLERS):
                refused("stream", caller, service=self.service)
                writer.write(end_frame(End(error=f"{caller.name} ({caller.peer}) may not open "
                                                 f"{self.service}'s streams")))
                return
            try:
                kind, payload = await asyncio.wait_for(read_frame(reader), OPEN_TIMEOUT)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ProtocolError, ConnectionError, OSError):
                return
            token = payload.decode(errors="replace") if kind == OPEN else ""
            timer = self._unclaimed.pop(token, None)
            if timer is None:
                writer.write(end_frame(End(error=f"streaming session not found in {self.service} "
                                                 "(ended, expired or claimed)")))
                return
            timer.cancel()
            await self._serve(token, self.sessions[token], reader, writer)
        except asyncio.CancelledError:
            pass  # close() ends the connections; the server's callback must not see a cancelled task
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(self, token: str, session: StreamSession, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        stream = DaemonStream(reader, writer, session)
        frames = asyncio.create_task(stream.read_frames(), name=f"stream-frames-{session.kind}")
        work = asyncio.create_task(session.serve(stream), name=f"stream-{session.kind}")
        end: End | None = None
        try:
            await asyncio.wait({frames, work}, return_when=asyncio.FIRST_COMPLETED)
            error = work.exception() if work.done() else None
            if isinstance(error, ConnectionError) or not work.done():
                log.info("stream_frontend_gone", kind=session.kind)
            elif error is None:
                end = work.result()
            else:
                log.error("stream_session_failed", kind=session.kind, error=repr(error))
                end = End(error=f"{session.kind} session failed: {error}")
        except asyncio.CancelledError:
            end = End(error=f"{self.service} stopped; the {session.kind} session was ended")
            raise
        finally:
            for task in (frames, work):
                task.cancel()
            await asyncio.gather(frames, work, return_exceptions=True)
            if end is not None:
                stream.send_end(end)
            self.sessions.pop(token, None)
            await session.close()


# -- the frontend's side -----------------------------------------------------------


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
                if kind == WINDOW and len(payload) == _COUNT.size:
                    self._credit += _COUNT.unpack(payload)[0]
                    self._credit_open.set()
                    continue
                if kind in (STDOUT, STDERR):
                    return kind, payload
                if kind != END:
                    raise ProtocolError(f"unexpected frame kind {kind}")
                end = _decode_end(payload)
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
        await self._control(frame(RESIZE, _SIZE.pack(width, height)))

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
