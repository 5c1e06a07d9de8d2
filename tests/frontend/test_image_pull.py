"""PullImage's story: what the frontend undoes when a step after the fetch fails."""

from __future__ import annotations

import time
from typing import Any

import pytest
from cri_api.v1 import api_pb2

from services.frontend import image_pull
from services.frontend.registry import CallContext
from shared import errors
from shared.config import Config

IMAGE = "sha256:" + "1" * 64
CHAIN = ["sha256:" + "a" * 64, "sha256:" + "b" * 64]


class ScriptedDaemons:
    """Answers bus calls from a script; a step named in `failing` raises ResourceExhausted."""

    def __init__(self, failing: tuple[str, str]) -> None:
        self.failing = failing
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def call(self, daemon: str, method: str, *, deadline: float, **params: Any) -> Any:
        self.calls.append((daemon, method, params))
        if (daemon, method) == self.failing:
            raise errors.ResourceExhausted(f"{daemon}.{method}: no space left")
        return {
            ("imaged", "pull"): {"image_id": IMAGE, "layers": [{"digest": "d1"}, {"digest": "d2"}]},
            ("storaged", "unpack"): {"chain_ids": CHAIN, "top_layer": CHAIN[-1], "unpacked_size": 10},
            ("imaged", "top_layers"): ["sha256:" + "c" * 64],
        }.get((daemon, method), {})


async def pull(daemons: ScriptedDaemons) -> None:
    call = CallContext(daemons=daemons, config=Config(), deadline=time.time() + 30, request_id="r1",
                       grpc_context=None)  # type: ignore[arg-type]
    with pytest.raises(errors.ResourceExhausted):
        await image_pull._pull("example.com/a:latest", api_pb2.AuthConfig(), call)


async def test_a_failed_unpack_abandons_the_fetched_image() -> None:
    daemons = ScriptedDaemons(failing=("storaged", "unpack"))
    await pull(daemons)
    # storaged undid its own unpack; imaged drops the record that never became ready.
    assert [(d, m) for d, m, _ in daemons.calls] == [
        ("imaged", "pull"), ("storaged", "unpack"), ("imaged", "abandon")]
    assert daemons.calls[-1][2] == {"image_id": IMAGE}


@pytest.mark.parametrize("step", [("imaged", "set_top_layer"), ("imaged", "mark_ready")])
async def test_a_failure_after_the_unpack_also_releases_the_layers(step: tuple[str, str]) -> None:
    daemons = ScriptedDaemons(failing=step)
    await pull(daemons)
    undo = [(d, m, p) for d, m, p in daemons.calls if m in ("abandon", "top_layers", "gc_layers")]
    # Only this pull's layers are candidates, and those another image's stack needs are kept.
    assert undo == [("imaged", "abandon", {"image_id": IMAGE}), ("imaged", "top_layers", {}),
                    ("storaged", "gc_layers", {"keep_top_layers": ["sha256:" + "c" * 64], "only": CHAIN})]
