"""PullImage's story: what the frontend undoes when a step after the fetch fails, and the lease on its layers."""

from __future__ import annotations

import asyncio
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
    """Answers bus calls from a script; a step named in `failing` raises ResourceExhausted.

    A step named in `gate` waits until the test opens it.
    """

    def __init__(self, failing: tuple[str, str] | None = None, gate: tuple[str, str] | None = None,
                 progress: list[dict[str, Any]] | None = None) -> None:
        self.failing = failing
        self.gate = gate
        # imaged's answers to pull_progress, one per call, then None (the pull ended);
        # those calls are kept apart from `calls`.
        self.progress = list(progress or [])
        self.progress_asked: list[dict[str, Any]] = []
        self.pulled = asyncio.Event()
        self.opened = asyncio.Event()
        self.reached = asyncio.Event()
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.collected = asyncio.Event()

    async def call(self, daemon: str, method: str, *, deadline: float, **params: Any) -> Any:
        if method == "pull_progress":
            self.progress_asked.append(params)
            if self.progress:
                await asyncio.sleep(0)
                return self.progress.pop(0)
            await self.pulled.wait()  # imaged answers once the pull has ended
            return None
        self.calls.append((daemon, method, params))
        if (daemon, method) == ("imaged", "pull"):
            # The fetch ends once imaged has told every layer stored.
            while self.progress:
                await asyncio.sleep(0)
            self.pulled.set()
        if method == "gc_layers":
            self.collected.set()
        if (daemon, method) == self.gate:
            self.reached.set()
            await self.opened.wait()
        if (daemon, method) == self.failing:
            raise errors.ResourceExhausted(f"{daemon}.{method}: no space left")
        return {
            ("imaged", "pull"): {"image_id": IMAGE, "layers": [{"digest": "d1"}, {"digest": "d2"}]},
            ("storaged", "unpack"): {"chain_ids": CHAIN, "top_layer": CHAIN[-1], "unpacked_size": 10},
            ("imaged", "top_layers"): ["sha256:" + "c" * 64],
        }.get((daemon, method), {})

    def steps(self) -> list[tuple[str, str]]:
        return [(d, m) for d, m, _ in self.calls]


def call_context(daemons: ScriptedDaemons) -> CallContext:
    return CallContext(daemons=daemons, config=Config(), deadline=time.time() + 30, request_id="r1",
                       grpc_context=None)  # type: ignore[arg-type]


async def pull(daemons: ScriptedDaemons) -> None:
    with pytest.raises(errors.ResourceExhausted):
        await image_pull._pull("example.com/a:latest", api_pb2.AuthConfig(), call_context(daemons))


async def test_a_pull_leases_its_layers_until_imaged_lists_the_image() -> None:
    daemons = ScriptedDaemons()
    assert await image_pull._pull("example.com/a:latest", api_pb2.AuthConfig(), call_context(daemons)) == IMAGE
    assert daemons.steps() == [("imaged", "pull"), ("storaged", "unpack"), ("imaged", "set_top_layer"),
                               ("imaged", "mark_ready"), ("storaged", "release_layers")]
    lease = daemons.calls[1][2]["lease"]
    assert lease and daemons.calls[1][2]["lease_seconds"] > 30
    assert daemons.calls[-1][2] == {"lease": lease}


async def test_a_failed_unpack_abandons_the_fetched_image() -> None:
    daemons = ScriptedDaemons(failing=("storaged", "unpack"))
    await pull(daemons)
    # storaged undid its own unpack; imaged drops the record that never became ready.
    assert daemons.steps() == [
        ("imaged", "pull"), ("storaged", "unpack"), ("imaged", "abandon"), ("storaged", "release_layers")]
    assert daemons.calls[2][2] == {"image_id": IMAGE}


@pytest.mark.parametrize("step", [("imaged", "set_top_layer"), ("imaged", "mark_ready")])
async def test_a_failure_after_the_unpack_also_releases_the_layers(step: tuple[str, str]) -> None:
    daemons = ScriptedDaemons(failing=step)
    await pull(daemons)
    undo = [(d, m, p) for d, m, p in daemons.calls if m in ("abandon", "release_layers", "top_layers", "gc_layers")]
    # The lease ends first, then only this pull's layers are candidates, and those another image's stack needs are kept.
    assert undo == [("imaged", "abandon", {"image_id": IMAGE}),
                    ("storaged", "release_layers", {"lease": daemons.calls[1][2]["lease"]}),
                    ("imaged", "top_layers", {}),
                    ("storaged", "gc_layers", {"keep_top_layers": ["sha256:" + "c" * 64], "only": CHAIN})]


async def test_a_pull_the_caller_gives_up_on_is_still_undone() -> None:
    daemons = ScriptedDaemons(failing=("imaged", "mark_ready"), gate=("imaged", "set_top_layer"))
    handler = asyncio.ensure_future(image_pull._pull("example.com/a:latest", api_pb2.AuthConfig(),
                                                     call_context(daemons)))
    await daemons.reached.wait()
    handler.cancel()  # what gRPC does when the kubelet's deadline passes
    with pytest.raises(asyncio.CancelledError):
        await handler
    daemons.opened.set()
    await asyncio.wait_for(daemons.collected.wait(), 10)
    assert daemons.steps()[-5:] == [("imaged", "mark_ready"), ("imaged", "abandon"), ("storaged", "release_layers"),
                                    ("imaged", "top_layers"), ("storaged", "gc_layers")]


async def test_past_its_deadline_the_caller_hears_where_the_pull_is_and_the_pull_goes_on() -> None:
    daemons = ScriptedDaemons(gate=("imaged", "set_top_layer"))
    call = call_context(daemons)
    call.deadline = time.time() + 0.2
    with pytest.raises(errors.DeadlineExceeded, match="imaged.set_top_layer did not complete"):
        await image_pull._pull("example.com/a:latest", api_pb2.AuthConfig(), call)
    daemons.opened.set()
    while ("storaged", "release_layers") not in daemons.steps():
        await asyncio.sleep(0)
    assert daemons.steps()[-2:] == [("imaged", "mark_ready"), ("storaged", "release_layers")]


LAYERS = [{"digest": f"d{i}", "diff_id": f"sha256:{i}" * 1, "path": f"/blobs/d{i}"} for i in range(3)]


class UnpackingDaemons(ScriptedDaemons):
    """storaged's unpack answers with a chain id per layer it was given."""

    async def call(self, daemon: str, method: str, *, deadline: float, **params: Any) -> Any:
        result = await super().call(daemon, method, deadline=deadline, **params)
        if (daemon, method) == ("storaged", "unpack"):
            chain = [f"chain-{layer['digest']}" for layer in params["layers"]]
            return {"chain_ids": chain, "top_layer": chain[-1], "unpacked_size": len(chain)}
        if (daemon, method) == ("imaged", "pull"):
            return {"image_id": IMAGE, "layers": LAYERS}
        return result


async def test_layers_are_unpacked_as_imaged_stores_them() -> None:
    # Layer 1 arrives first (nothing to unpack: 0 is missing below it), then 0, then 2.
    daemons = UnpackingDaemons(progress=[{"layers": LAYERS, "fetched": [1]}, {"layers": LAYERS, "fetched": [0, 1]},
                                         {"layers": LAYERS, "fetched": [0, 1, 2]}])
    assert await image_pull._pull("example.com/a:latest", api_pb2.AuthConfig(), call_context(daemons)) == IMAGE
    unpacks = [[layer["digest"] for layer in p["layers"]] for d, m, p in daemons.calls if m == "unpack"]
    # Each stack as soon as it is whole from the bottom, then the pull's own (which finds them there).
    assert unpacks == [["d0", "d1"], ["d0", "d1", "d2"], ["d0", "d1", "d2"]]
    assert [p["fetched"] for p in daemons.progress_asked] == [0, 1, 2, 3]
    leases = {p["lease"] for d, m, p in daemons.calls if m == "unpack"}
    assert len(leases) == 1
    assert daemons.steps()[-3:] == [("imaged", "set_top_layer"), ("imaged", "mark_ready"),
                                    ("storaged", "release_layers")]


async def test_a_pull_whose_later_layer_fails_leaves_nothing_unpacked() -> None:
    # The bottom layer is stored and unpacked, then the fetch of another fails.
    daemons = UnpackingDaemons(failing=("imaged", "pull"), progress=[{"layers": LAYERS, "fetched": [0]}])
    await pull(daemons)
    assert daemons.steps() == [("imaged", "pull"), ("storaged", "unpack"), ("storaged", "release_layers"),
                               ("imaged", "top_layers"), ("storaged", "gc_layers")]
    lease = daemons.calls[1][2]["lease"]
    assert daemons.calls[2][2] == {"lease": lease}
    assert daemons.calls[-1][2] == {"keep_top_layers": ["sha256:" + "c" * 64], "only": ["chain-d0"]}


async def test_an_early_unpack_that_fails_fails_the_pull_and_is_undone() -> None:
    class Refusing(UnpackingDaemons):
        async def call(self, daemon: str, method: str, *, deadline: float, **params: Any) -> Any:
            if method == "unpack" and len(params["layers"]) == 2:
                self.calls.append((daemon, method, params))
                raise errors.InvalidArgument("layer d1: a path escapes the root")
            return await super().call(daemon, method, deadline=deadline, **params)

    daemons = Refusing(progress=[{"layers": LAYERS, "fetched": [0]}, {"layers": LAYERS, "fetched": [0, 1]}])
    with pytest.raises(errors.InvalidArgument, match="escapes"):
        await image_pull._pull("example.com/a:latest", api_pb2.AuthConfig(), call_context(daemons))
    assert ("storaged", "unpack") not in daemons.steps()[daemons.steps().index(("imaged", "abandon")):]
    assert daemons.steps()[-4:] == [("imaged", "abandon"), ("storaged", "release_layers"),
                                    ("imaged", "top_layers"), ("storaged", "gc_layers")]
    assert daemons.calls[-1][2]["only"] == ["chain-d0"]
