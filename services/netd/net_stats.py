"""Interface counters of pods' network namespaces (for PodSandboxStats and the network metrics).

The counters are read by a child process (net_stats_child.py) that enters each
namespace; one child serves a whole request, whatever the number of pods.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import structlog

from shared.errors import DeadlineExceeded, Internal

log = structlog.get_logger(__name__)

_CHILD = Path(__file__).with_name("net_stats_child.py")
DEFAULT_TIMEOUT = 10.0


async def read_counters(netns_paths: list[str], timeout: float = DEFAULT_TIMEOUT) -> dict[str, dict[str, Any]]:
    """{netns path: {"timestamp_ns", "interfaces": {name: counters}} or {"error"}} for each path."""
    if not netns_paths:
        return {}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", str(_CHILD), *netns_paths,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError) as e:
        proc.kill()
        await proc.wait()
        if isinstance(e, asyncio.CancelledError):
            raise
        raise DeadlineExceeded(f"reading network counters took more than {timeout:g}s") from None
    if proc.returncode != 0:
        raise Internal(f"reading network counters: {stderr.decode(errors='replace').strip() or proc.returncode}")
    try:
        return json.loads(stdout)
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
