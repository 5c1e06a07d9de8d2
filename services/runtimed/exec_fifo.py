"""Starting a created runc container through its exec fifo, without a `runc start` process.

`runc create` leaves the container's init blocked opening `exec.fifo` in the
container's state directory for writing; `runc start` opens it for reading,
reads the one byte init writes, and removes the fifo, and init goes on to
exec the container's process. That is all `runc start` does for a created
container, but as a process of its own it costs a Go start-up and a state
load, about 5 ms of every StartContainer. runtimed does the same three steps
itself, for handlers whose runtime is runc (runc has kept this protocol since
1.0). `runc state` then says running, as after `runc start`.

Anything unexpected (no fifo, not a fifo) returns False and the caller runs
`runc start`, which gives runc's own answer.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time

from services.runtimed import paths, process
from shared import tracing
from shared.errors import DeadlineExceeded, FailedPrecondition

FIFO_NAME = "exec.fifo"
# How often a start that waits for init checks that init still lives (as runc does).
_LIVENESS_INTERVAL = 0.1


async def start(runc_root: str, container_id: str, init_pid: int, init_start: int | None, *,
                timeout: float) -> bool:
    """Let the created container's init exec its process; False when runc should be asked instead."""
    path = os.path.join(runc_root, container_id, FIFO_NAME)
    fd = paths.open_for_reading(path, stat.S_ISFIFO)
    if fd is None:
        return False
    try:
        with tracing.tracer(__name__).start_as_current_span(
                "exec fifo start", attributes={"criopy.container_id": container_id}):
            await _wait_readable(fd, init_pid, init_start, timeout)
            # Gone first: once init has written its byte it goes on whether or not it is read, and runc
            # tells created from running by this file alone.
            os.unlink(path)
            try:
                byte = os.read(fd, 1)
            except BlockingIOError:
                byte = b""
            if not byte:
                # Init opened and closed the fifo without its byte: it is gone, or some other reader took it.
                raise FailedPrecondition(f"container {container_id} cannot start: its process is not waiting")
        return True
    finally:
        os.close(fd)


async def _wait_readable(fd: int, init_pid: int, init_start: int | None, timeout: float) -> None:
    """Until init has written its byte (it opens the fifo as soon as we hold it open for reading)."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(readable), _LIVENESS_INTERVAL)
                return
            except TimeoutError:
                pass
            if not process.still_running(init_pid, init_start):
                # It may have written and ended between two checks: the byte would still be there.
                return
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"the container's init did not open its exec fifo within {timeout:g}s")
    finally:
        loop.remove_reader(fd)
