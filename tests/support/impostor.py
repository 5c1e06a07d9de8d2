"""A process with one service's exact credentials, trying sockets: `python -m tests.support.impostor`.

It reads a JSON document on stdin:

    {"credentials": {uid, gid, groups, capability_sets}, "probes": [{kind, path, ...}, ...]}

takes the credentials as `criopy status` reports them (shared/privileges.py
does the work, as for the services themselves), runs each probe and prints
one JSON document: the credentials it ended up with (read back from /proc)
and a result per probe.

    bus     connect, send one request (`method`, `params`), wait for the reply
    events  connect a subscriber, wait for the handshake's outcome
    stream  connect, claim a session that does not exist, read what comes back
    connect a plain connect() (the CRI socket)
    fuzz    from this peer, `count` hostile frames to a daemon's bus socket, then one normal call
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import sys
import time
import uuid
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import parse_monitor_message

from shared import identities, privileges
from shared.bus import streams
from shared.bus.envelope import PROTOCOL_VERSION, Request

TIMEOUT = 5.0


def assume(credentials: dict[str, Any]) -> None:
    uid, gid, groups = credentials["uid"], credentials["gid"], frozenset(credentials["groups"])
    sets = credentials["capability_sets"]
    keep, bounding = frozenset(sets["CapPrm"]), frozenset(sets["CapBnd"])
    if uid != 0:
        privileges.restrict_to(keep | {"CAP_SETUID", "CAP_SETGID"}, bounding=bounding)
        privileges.switch_to(uid, gid, groups)
        privileges.restrict_to(keep)
    else:
        privileges.switch_to(uid, gid, groups)
        privileges.restrict_to(keep, bounding=bounding)


def plain_connect(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, str(e))
    return "ok"


def _dealer(context: zmq.Context, path: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{path}")
    return sock


def _reply(sock: zmq.Socket, request_id: str, timeout: float = TIMEOUT) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000)):
            return None
        body = msgpack.unpackb(sock.recv_multipart()[-1], raw=False)
        if body.get("id") == request_id:
            return body
    return None


def bus(context: zmq.Context, probe: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"connect": plain_connect(probe["path"])}
    if result["connect"] != "ok":
        return result
    sock = _dealer(context, probe["path"])
    request = Request(method=probe["method"], params=probe.get("params", {}), deadline=time.time() + TIMEOUT)
    sock.send(request.encode())
    body = _reply(sock, request.id)
    sock.close()
    if body is None:
        result["reply"] = "none"
    elif "error" in body:
        result["reply"] = body["error"]["code"]
        result["message"] = body["error"]["message"]
    else:
        result["reply"] = "OK"
    return result


def events(context: zmq.Context, probe: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"connect": plain_connect(probe["path"])}
    if result["connect"] != "ok":
        return result
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    sock.connect(f"ipc://{probe['path']}")
    result["handshake"] = "none"
    if monitor.poll(int(TIMEOUT * 1000)):
        event = parse_monitor_message(monitor.recv_multipart())["event"]
        result["handshake"] = "succeeded" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else "refused"
    sock.disable_monitor()
    monitor.close()
    sock.close()
    return result


def stream(probe: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"connect": plain_connect(probe["path"])}
    if result["connect"] != "ok":
        return result
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(probe["path"])
        try:
            sock.sendall(streams.frame(streams.OPEN, b"no-such-token"))
        except OSError:
            pass  # a refused peer may find the connection closed already; what came back is still there
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    if len(data) >= streams.HEADER.size:
        kind, size = streams.HEADER.unpack(data[:streams.HEADER.size])
        if kind == streams.END:
            result["end"] = msgpack.unpackb(data[streams.HEADER.size:streams.HEADER.size + size])["error"]
    return result


# -- hostile frames ------------------------------------------------------------------------


def _envelope(**fields: Any) -> dict[str, Any]:
    body = {"v": PROTOCOL_VERSION, "id": uuid.uuid4().hex, "method": "health", "params": {},
            "deadline": time.time() + 60, "traceparent": None}
    body.update(fields)
    return body


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randrange(-2**63, 2**63)
    if kind == 1:
        return rng.random() * 10 ** rng.randrange(-5, 300)
    if kind == 2:
        return rng.randbytes(rng.randrange(64))
    if kind == 3:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(32)))
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    return {_random_value(rng, 3) if rng.random() < 0.3 else f"k{rng.randrange(9)}": _random_value(rng, depth + 1)
            for _ in range(rng.randrange(6))}


def hostile_frames(rng: random.Random, count: int, max_message_bytes: int,
                   read_methods: list[str]) -> list[tuple[list[bytes], str | None]]:
    """(frames, the request id a reply must name; None when the daemon must drop it)."""
    made: list[tuple[list[bytes], str | None]] = []

    def add(body: Any, replied: bool) -> None:
        payload = msgpack.packb(body, use_bin_type=True)
        made.append(([payload], body["id"] if replied else None))

    wrong_types = [
        {"v": 2}, {"v": "1"}, {"method": ""}, {"method": 7}, {"method": None}, {"params": [1, 2]},
        {"params": {1: "x"}}, {"params": "x"}, {"deadline": "soon"}, {"deadline": True}, {"deadline": None},
        {"traceparent": 5},
    ]
    bad_ids = [{"id": 7}, {"id": ""}, {"id": "x" * 129}, {"id": None}, {"id": ["a"]}]
    while len(made) < count:
        kind = rng.randrange(9)
        if kind == 0:  # a valid request cut short: no id can be read, it is dropped
            full = msgpack.packb(_envelope(), use_bin_type=True)
            made.append(([full[:rng.randrange(1, len(full))]], None))
        elif kind == 1:  # a wrong type in one field of an envelope with an id
            add(_envelope(**rng.choice(wrong_types)), True)
        elif kind == 2:  # no readable id: dropped
            add(_envelope(**rng.choice(bad_ids)), False)
        elif kind == 3:  # a method nobody has
            add(_envelope(method=f"no_such_{rng.randrange(10**6)}"), True)
        elif kind == 4:  # a real method, params it does not take
            add(_envelope(method=rng.choice(read_methods), params={f"p{rng.randrange(9)}": _random_value(rng)}), True)
        elif kind == 5:  # a deadline already gone
            add(_envelope(deadline=time.time() - 5), True)
        elif kind == 6:  # random msgpack that is no envelope
            value = _random_value(rng)
            if isinstance(value, dict):
                value.pop("id", None)
            made.append(([msgpack.packb(value, use_bin_type=True)], None))
        elif kind == 7:  # random bytes, or too many frames
            made.append(([rng.randbytes(rng.randrange(1, 256))] * rng.choice([1, 2]), None))
        else:  # far larger than a daemon reads, with a readable id
            if sum(1 for frames, _ in made if len(frames[0]) > max_message_bytes) < 2:
                add(_envelope(params={"blob": b"\0" * (max_message_bytes + 1)}), True)
    return made


def fuzz(context: zmq.Context, probe: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(probe["seed"])
    frames = hostile_frames(rng, probe["count"], probe["max_message_bytes"], probe["read_methods"])
    sock = _dealer(context, probe["path"])
    expected = {request_id for _, request_id in frames if request_id is not None}
    codes: dict[str, int] = {}
    unexpected: list[str] = []
    got: set[str] = set()

    def drain(wait_ms: int) -> None:
        while sock.poll(wait_ms):
            body = msgpack.unpackb(sock.recv_multipart()[-1], raw=False)
            request_id = body.get("id")
            if request_id not in expected or request_id in got or "error" not in body:
                unexpected.append(json.dumps(body, default=str)[:300])
                continue
            got.add(request_id)
            codes[body["error"]["code"]] = codes.get(body["error"]["code"], 0) + 1
            wait_ms = 0

    for parts, _ in frames:
        sock.send_multipart(parts)
        drain(0)
    deadline = time.monotonic() + probe.get("settle", 60.0)
    while got != expected and time.monotonic() < deadline:
        drain(200)
    # A normal call still works, on the same connection.
    normal = Request(method="health", params={}, deadline=time.time() + TIMEOUT)
    sock.send(normal.encode())
    body = _reply(sock, normal.id)
    sock.close()
    return {"sent": len(frames), "expected_replies": len(expected), "replies": len(got),
            "missing": len(expected - got), "codes": codes, "unexpected": unexpected[:5],
            "health_after": None if body is None else body.get("result", {}).get("ready")}


def main() -> None:
    spec = json.load(sys.stdin)
    assume(spec["credentials"])
    context = zmq.Context()
    results = []
    for probe in spec["probes"]:
        kind = probe["kind"]
        if kind == "bus":
            results.append(bus(context, probe))
        elif kind == "events":
            results.append(events(context, probe))
        elif kind == "stream":
            results.append(stream(probe))
        elif kind == "connect":
            results.append({"connect": plain_connect(probe["path"])})
        elif kind == "fuzz":
            results.append(fuzz(context, probe))
        else:
            raise ValueError(f"unknown probe {kind}")
    context.term()
    json.dump({"credentials": identities.describe_process(os.getpid()), "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
