"""Values of CRI requests as `MessageToDict(..., preserving_proto_field_name=True)` gives them.

int64 values may arrive as strings, enums as their names or their numbers,
defaults left out.
"""

from __future__ import annotations

import re
from typing import Any

from shared.errors import InvalidArgument

_NS_MODES = {None: "POD", 0: "POD", 1: "CONTAINER", 2: "NODE", 3: "TARGET",
             "POD": "POD", "CONTAINER": "CONTAINER", "NODE": "NODE", "TARGET": "TARGET"}


def i64(value: Any, what: str, default: int | None = None) -> int | None:
    """An int64 field: MessageToDict writes them as strings."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise InvalidArgument(f"{what} must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise InvalidArgument(f"{what} must be an integer, not {value!r:.40}")


def wrapped_int(value: Any, what: str) -> int | None:
    """An Int64Value wrapper: {"value": "1000"}; absent means unset."""
    if value is None:
        return None
    if isinstance(value, dict):
        return i64(value.get("value", 0), what, 0)
    return i64(value, what)


def ns_mode(options: dict[str, Any] | None, kind: str) -> str:
    value = (options or {}).get(kind)
    if value not in _NS_MODES:
        raise InvalidArgument(f"unknown namespace mode for {kind}: {value!r}")
    return _NS_MODES[value]
