"""Interface counters of pods' network namespaces (for PodSandboxStats and the network metrics).

The counters are read by a child process (net_stats_child.py) that enters each
namespace; one child serves a whole request, whatever the number of pods.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import structlog

from shared import programs
from shared.errors import DeadlineExceeded, Internal

log = structlog.get_logger(__name__)

_CHILD = Path(__file__).with_name("net_stats_child.py")
DEFAULT_TIMEOUT = 10.0


async def read_counters(netns_paths: list[str], timeout: float = DEFAULT_TIMEOUT) -> dict[str, dict[str, Any]]:
    """{netns path: {"timestamp_ns", "interfaces": {name: counters}} or {"error"}} for each path."""
    if not netns_paths:
        return {}
    try:
        result = await programs.run([sys.executable, "-I", "-S", str(_CHILD), *netns_paths], timeout=timeout)
    except DeadlineExceeded:
        raise DeadlineExceeded(f"reading network counters took more than {timeout:g}s") from None
    if result.returncode != 0:
        raise Internal(f"reading network counters: {result.stderr.decode(errors='replace').strip() or result.returncode}")
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise Internal("reading network counters: unreadable output of the child") from None


def pod_usage(counters: dict[str, Any], default_interface: str) -> dict[str, Any]:
    """A pod's counters shaped like CRI NetworkUsage (loopback left out), plus the raw counters."""
    if "error" in counters:
        return {"error": counters["error"]}
    interfaces = []
    for name, c in sorted((counters.get("interfaces") or {}).items()):
        if name == "lo":
            continue
        interfaces.append({"name": name, "rx_bytes": c["rx_bytes"], "rx_errors": c["rx_errors"],
                           "tx_bytes": c["tx_bytes"], "tx_errors": c["tx_errors"],
                           "rx_packets": c["rx_packets"], "tx_packets": c["tx_packets"],
                           "rx_dropped": c["rx_dropped"], "tx_dropped": c["tx_dropped"]})
    default = next((i for i in interfaces if i["name"] == default_interface), interfaces[0] if interfaces else None)
    return {"timestamp_ns": counters.get("timestamp_ns", 0), "default_interface": default,
            "interfaces": interfaces}
