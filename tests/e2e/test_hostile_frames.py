"""Hostile frames from an allowed peer: every daemon answers each with an error or drops it, and lives on.

A process with the frontend's credentials (tests/support/impostor.py) sends
each daemon of `criopy run` a thousand frames: requests cut short, envelopes
with a field of the wrong type or no readable id, unknown methods, real
methods with params they do not take, deadlines already gone, random msgpack,
random bytes, too many frames, and messages beyond the size a daemon reads.
Every frame that carries a readable id gets an error reply naming it (never
a result), the others are dropped; no daemon restarts or grows by more than
a bound; a normal call on the same connection works after.
"""

from __future__ import annotations

import pytest
from cri_api.v1 import api_pb2

from shared.bus.api import API
from shared.services import DAEMONS
from tests.e2e.test_privilege_drill import impersonate, stack_config
from tests.support.stack import Stack

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

FRAMES_PER_DAEMON = 1000
# A daemon reads up to max_message_bytes (16 MiB) of a message it refuses; what it keeps after must stay small.
MEMORY_BOUND = 96 * 1024 * 1024


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_each_daemon_survives_a_thousand_hostile_frames(stack: Stack) -> None:
    config = stack_config(stack.dirs)
    status = stack.status()
    pids = {name: status[name]["pid"] for name in DAEMONS}
    before = {name: resident_bytes(pid) for name, pid in pids.items()}
    probes = [{"kind": "fuzz", "path": config.bus_endpoint(name).removeprefix("ipc://"), "seed": seed,
               "count": FRAMES_PER_DAEMON, "max_message_bytes": config.criopy.bus.max_message_bytes,
               "read_methods": sorted(API[name].methods)}
              for seed, name in enumerate(DAEMONS)]
    report = impersonate(status["frontend"], probes, timeout=540)

    for name, result in zip(DAEMONS, report["results"]):
        assert result["sent"] == FRAMES_PER_DAEMON, name
        assert result["unexpected"] == [], (name, result)
        assert result["missing"] == 0 and result["replies"] == result["expected_replies"] > 0, (name, result)
        assert set(result["codes"]) <= {"INVALID_ARGUMENT", "UNIMPLEMENTED", "DEADLINE_EXCEEDED",
                                        "RESOURCE_EXHAUSTED"}, (name, result["codes"])
        assert {"INVALID_ARGUMENT", "UNIMPLEMENTED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"} <= set(result["codes"])
        assert result["health_after"] is True, (name, result)

    after = stack.status()
    for name, pid in pids.items():
        assert after[name]["pid"] == pid and after[name]["restarts"] == 0, (name, after[name])
        grown = resident_bytes(pid) - before[name]
        assert grown < MEMORY_BOUND, (name, grown)
    # And the whole runtime still answers the CRI.
    conditions = {c.type: c.status for c in
                  stack.runtime.Status(api_pb2.StatusRequest(), timeout=10).status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}
