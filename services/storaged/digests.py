"""Layer identities: diff ids (digest of a layer's uncompressed tar) and chain ids."""

from __future__ import annotations

import hashlib
import re

from shared.errors import InvalidArgument

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def is_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST.match(value) is not None


def check_digest(value: object, what: str) -> str:
    if not is_digest(value):
        raise InvalidArgument(f"{what}: {value!r:.100} is not a sha256 digest (sha256:<64 hex>)")
    return value  # type: ignore[return-value]


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain id of each layer of a stack, bottom first (OCI image spec).

    chain_id(1) = diff_id(1); chain_id(n) = sha256(chain_id(n-1) + " " + diff_id(n)).
    """
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            text = f"{out[-1]} {diff_id}".encode()
            out.append("sha256:" + hashlib.sha256(text).hexdigest())
    return out


def hex_of(digest: str) -> str:
    return digest.split(":", 1)[1]
