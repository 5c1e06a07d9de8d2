"""Child program: connect to a port on a pod's loopback and hand the socket back.

    python -I -S port_forward_child.py <netns path> <port> <fd of a unix socket>

Runs as a short-lived child of netd so that setns() never touches the daemon.
It enters the pod's network namespace, connects to 127.0.0.1:<port> (then
[::1]:<port>), and sends the connected socket over the inherited unix socket
(SCM_RIGHTS). The socket keeps its namespace after this process exits. On
failure it sends the reason as text instead; exit status 0 only on success.
Standard library only.
"""

import ctypes
import os
import socket
import sys

CLONE_NEWNET = 0x40000000
CONNECT_TIMEOUT = 10.0


def enter_netns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def connect(port: int) -> socket.socket:
    errors = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect((host, port))
            sock.settimeout(None)
            return sock
        except OSError as e:
            errors.append(f"dial tcp {host}:{port}: {e.strerror or e}")
            sock.close()
    raise ConnectionError("; ".join(errors))


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        sys.stderr.write("usage: port_forward_child.py <netns path> <port> <unix socket fd>\n")
        return 2
    channel = socket.socket(fileno=int(argv[3]))
    try:
        if argv[1] != "-":
            enter_netns(argv[1])
        sock = connect(int(argv[2]))
    except (OSError, ConnectionError, ValueError) as e:
        channel.sendall(f"error: {e}".encode())
        return 1
    socket.send_fds(channel, [b"ok"], [sock.fileno()])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
