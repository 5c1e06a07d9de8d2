"""Child program: the interface counters of network namespaces, as JSON on stdout.

    python -I -S net_stats_child.py /var/run/netns/criopy-<pod1> /var/run/netns/criopy-<pod2> ...

Enters each namespace in turn (setns) and reads /proc/net/dev, which shows the
namespace of the reading process. Runs as a short-lived child of netd so the
daemon never changes its own namespaces. Standard library only. Prints
{"<path>": {"timestamp_ns": int, "interfaces": {...}} or {"error": "..."}}.
"""

import ctypes
import json
import os
import sys
import time

CLONE_NEWNET = 0x40000000
_FIELDS = ("rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "rx_fifo", "rx_frame", "rx_compressed",
           "rx_multicast", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped", "tx_fifo", "tx_collisions",
           "tx_carrier", "tx_compressed")

_libc = ctypes.CDLL(None, use_errno=True)


def parse_net_dev(text: str) -> dict:
    """Counters per interface from the text of /proc/net/dev."""
    out = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        values = rest.split()
        if len(values) < len(_FIELDS):
            continue
        out[name.strip()] = {k: int(v) for k, v in zip(_FIELDS, values)}
    return out


def read_netns(path: str) -> dict:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
    with open("/proc/self/net/dev") as f:
        text = f.read()
    return {"timestamp_ns": time.time_ns(), "interfaces": parse_net_dev(text)}


def main(paths: list) -> int:
    result = {}
    for path in paths:
        try:
            result[path] = read_netns(path)
        except OSError as e:
            result[path] = {"error": f"{path}: {e.strerror or e}"}
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
