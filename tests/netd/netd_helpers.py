"""Traffic helpers: a TCP listener inside a pod namespace and a client anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import AsyncIterator

LISTENER = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(8)
print("ready", flush=True)
while True:
    c, addr = s.accept()
    c.sendall(("hello from pod to " + addr[0]).encode())
    c.close()
"""

CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
with socket.create_connection((host, port), timeout=5) as s:
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
print(data.decode())
"""


def in_netns(netns_path: str | None, *argv: str) -> list[str]:
    return (["nsenter", f"--net={netns_path}"] if netns_path else []) + list(argv)


@contextlib.asynccontextmanager
async def listener(netns_path: str, host: str, port: int) -> AsyncIterator[None]:
    """A TCP server in the pod namespace that greets each client with its address."""
    proc = await asyncio.create_subprocess_exec(
        *in_netns(netns_path, sys.executable, "-c", LISTENER, host, str(port)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if line.strip() != b"ready":
            err = await proc.stderr.read()
            raise AssertionError(f"listener did not start: {line!r} {err.decode()}")
        yield
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def connect(netns_path: str | None, host: str, port: int) -> str:
    """Connect from a namespace (None: the host) and return what the server said."""
    proc = await asyncio.create_subprocess_exec(
        *in_netns(netns_path, sys.executable, "-c", CLIENT, host, str(port)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    if proc.returncode != 0:
        raise ConnectionError(f"connect to {host}:{port} failed: {err.decode().strip().splitlines()[-1:]}")
    return out.decode().strip()
