"""Pods and containers named by their id or by a unique prefix of it, as the CRI's clients name them (`crictl ps`
shows 13 characters): runtimed's records and the frontend's read model find them the same way."""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")

FULL_ID_LENGTH = 64


def find(table: Mapping[str, T], object_id: str) -> T | None:
    """The object with this id, or the only one whose id begins with it; None when there is none, or several."""
    found = table.get(object_id)
    if found is None and object_id and len(object_id) < FULL_ID_LENGTH:
        matches = [o for i, o in table.items() if i.startswith(object_id)]
        if len(matches) == 1:
            found = matches[0]
    return found
