"""The bus envelope: msgpack requests and replies, checked field by field.

A request:  {"v": 1, "id": str, "method": str, "params": map,
             "deadline": unix seconds (float), "traceparent": str | None}
A reply:    {"v": 1, "id": str, "result": any}   or
            {"v": 1, "id": str, "error": {"code", "message", "retriable"}}
            and, from a daemon with a state feed, "seq": [epoch, n]: the feed's
            position once the request was served (shared/bus/feed.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from shared.errors import CriopyError, InvalidArgument, from_wire

PROTOCOL_VERSION = 1


class MalformedMessage(InvalidArgument):
    """A frame that is not a valid envelope; `request_id` is set when one could be read."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass
class Request:
    method: str
    params: dict[str, Any]
    deadline: float
    traceparent: str | None = None
    id: str = field(default_factory=lambda: os.urandom(16).hex())  # as random as uuid4, at a quarter of its cost
    version: int = PROTOCOL_VERSION

    def remaining(self) -> float:
        return self.deadline - time.time()

    def encode(self) -> bytes:
        return msgpack.packb({
            "v": self.version, "id": self.id, "method": self.method, "params": self.params,
            "deadline": self.deadline, "traceparent": self.traceparent,
        }, use_bin_type=True)


@dataclass
class Reply:
    id: str
    result: Any = None
    error: CriopyError | None = None
    seq: tuple[str, int] | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": self.id}
        if self.error is not None:
            body["error"] = self.error.to_wire()
        else:
            body["result"] = self.result
        if self.seq is not None:
            body["seq"] = self.seq
        return msgpack.packb(body, use_bin_type=True)


def _unpack(frame: bytes) -> Any:
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise MalformedMessage(f"not a msgpack message: {e}") from None


def decode_request(frame: bytes) -> Request:
    body = _unpack(frame)
    if not isinstance(body, dict):
        raise MalformedMessage(f"a request must be a map, not {type(body).__name__}")
    request_id = body.get("id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > 128:
        raise MalformedMessage("request without a valid id")
    version = body.get("v")
    if version != PROTOCOL_VERSION:
        raise MalformedMessage(
            f"unsupported protocol version {version!r} (this daemon speaks {PROTOCOL_VERSION})", request_id)
    method = body.get("method")
    if not isinstance(method, str) or not method:
        raise MalformedMessage("request without a method name", request_id)
    params = body.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise MalformedMessage("params must be a map with string keys", request_id)
    deadline = body.get("deadline")
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool):
        raise MalformedMessage("request without a numeric deadline", request_id)
    traceparent = body.get("traceparent")
    if traceparent is not None and not isinstance(traceparent, str):
        raise MalformedMessage("traceparent must be a string", request_id)
    return Request(method=method, params=params, deadline=float(deadline),
                   traceparent=traceparent, id=request_id, version=version)


def peek_request_id(frame: bytes) -> str | None:
    """The id of a frame that is rejected before it is decoded in full (e.g. too large)."""
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:
        return None
    request_id = body.get("id") if isinstance(body, dict) else None
    return request_id if isinstance(request_id, str) and len(request_id) <= 128 else None


def decode_reply(frame: bytes) -> Reply:
    body = _unpack(frame)
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        raise MalformedMessage("reply without an id")
    seq = _seq(body.get("seq"))
    if "error" in body:
        return Reply(id=body["id"], error=from_wire(body["error"]), seq=seq)
    return Reply(id=body["id"], result=body.get("result"), seq=seq)


def _seq(value: Any) -> tuple[str, int] | None:
    """A reply's feed position; anything but [str, int] is ignored (it is only ever a hint to wait for)."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) \
            and isinstance(value[1], int) and not isinstance(value[1], bool):
        return value[0], value[1]
    return None
