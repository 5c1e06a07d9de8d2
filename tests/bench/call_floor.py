"""The floor under a CRI call answered in Python: a gRPC server that only replays answers from memory.

`bench_calls` records the answer crio-py gave to each call it times (the
same messages, of the same size) and starts this module as a process of its
own: a grpc.aio server on a unix socket, as crio-py's frontend is, that
answers each method with those bytes and does nothing else (no parsing of the
request, no logging, no tracing). The same client then times the same calls
against it. What crio-py takes beyond this floor is its own cost; the floor
is what any Python CRI server on this machine pays.

Run as `python -m tests.bench.call_floor SOCKET ANSWERS`: ANSWERS is a
msgpack map of full method names (`/runtime.v1.RuntimeService/Version`) to
serialized replies. It prints `ready` once it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import grpc
import msgpack


def _handler(answer: bytes) -> grpc.RpcMethodHandler:
    async def replay(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return answer

    # No (de)serializers: the request stays bytes, the answer is sent as it is.
    return grpc.unary_unary_rpc_method_handler(replay)


class _Replay(grpc.GenericRpcHandler):
    def __init__(self, answers: dict[str, bytes]) -> None:
        self._handlers = {method: _handler(answer) for method, answer in answers.items()}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)


async def _serve(socket: str, answers: dict[str, bytes]) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_Replay(answers),))
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await server.wait_for_termination()


@contextlib.contextmanager
def floor_server(socket: Path, answers: dict[str, bytes]) -> Iterator[grpc.Channel]:
    """The floor server, serving `answers` on `socket`; yields a channel to it."""
    answers_file = socket.with_suffix(".answers")
    answers_file.write_bytes(msgpack.packb(answers, use_bin_type=True))
    process = subprocess.Popen([sys.executable, "-m", "tests.bench.call_floor", str(socket), str(answers_file)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready", "floor server failed"
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            yield channel
    finally:
        process.terminate()
        process.wait(10)
        answers_file.unlink(missing_ok=True)


if __name__ == "__main__":
    with open(sys.argv[2], "rb") as f:
        replies = msgpack.unpackb(f.read(), raw=False)
    asyncio.run(_serve(sys.argv[1], replies))
