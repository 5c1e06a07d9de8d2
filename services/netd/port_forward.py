"""Port forwarding: TCP connections to a port on a pod's loopback, streamed to the frontend.

A connection is opened by `port_forward_child.py`, a short-lived child that
enters the pod's network namespace, connects, and passes the socket back over
a unix socket (SCM_RIGHTS); the daemon itself never changes namespace. The
bus call `pf_open` makes the connection; its bytes then go over the session's
stream (shared/bus/streams.py): STDIN frames to the pod, STDOUT frames from
it. The pod's socket is read only as fast as the stream takes it, so TCP flow
control slows the pod's side down when the client stops reading. The end of
the client's input half-closes the pod connection; the pod's end of stream
ends the session.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import structlog

from shared.bus.stream_frames import READ_SIZE, STDOUT, End
from shared.bus.streams import DaemonStream
from shared.errors import FailedPrecondition, Internal, InvalidArgument

log = structlog.get_logger(__name__)

_CHILD = Path(__file__).with_name("port_forward_child.py")
OPEN_TIMEOUT = 20.0


async def connect_in_netns(netns_path: str | None, port: int, timeout: float = OPEN_TIMEOUT) -> socket.socket:
    """A socket connected to 127.0.0.1:<port> (or [::1]) inside `netns_path` (None: netd's own)."""
    if not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidArgument(f"port {port!r} is not a valid TCP port")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", str(_CHILD), netns_path or "-", str(port), str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            raise Internal(f"cannot start the port-forward helper: {e.strerror}") from None
        theirs.close()
        try:
            _out, stderr = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise FailedPrecondition(f"connecting to port {port} in the pod timed out") from None
        ours.setblocking(False)
        try:
            message, fds, _flags, _addr = socket.recv_fds(ours, 4096, 1)
        except BlockingIOError:
            message, fds = b"", []
        if proc.returncode != 0 or not fds:
            for fd in fds:
                socket.close(fd)
            reason = message.decode(errors="replace").removeprefix("error: ") or \
                stderr.decode(errors="replace").strip() or f"helper exited with status {proc.returncode}"
            raise FailedPrecondition(f"cannot connect to port {port} in the pod: {reason}")
        return socket.socket(fileno=fds[0])
    finally:
        ours.close()
        theirs.close()


class ForwardedConnection:
    kind = "port-forward"

    def __init__(self, netns_path: str | None, port: int) -> None:
        self.netns_path = netns_path
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        sock = await connect_in_netns(self.netns_path, self.port)
        try:
            self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
        except BaseException:
            sock.close()
            raise
        log.info("port_forward_opened", port=self.port)

    async def serve(self, stream: DaemonStream) -> End:
        assert self.reader is not None
        feeder = asyncio.create_task(self._feed(stream))
        try:
            await stream.copy_output(self.reader, STDOUT)
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
        return End()

    async def _feed(self, stream: DaemonStream) -> None:
        """The client's bytes to the pod; their end half-closes the pod connection."""
        writer = self.writer
        assert writer is not None
        if await stream.copy_input(writer) and writer.can_write_eof():
            try:
                writer.write_eof()
            except OSError:
                pass  # the pod closed: its end of stream ends the session

    def resize(self, width: int, height: int) -> None:
        pass

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 5)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass
