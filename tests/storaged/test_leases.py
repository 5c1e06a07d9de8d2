"""Layers a caller still needs after its unpack call (a pull until imaged lists the image) survive collection,
and a collection and an unpack of the same layer do not trip over each other."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from services.storaged.layer_store import LayerStore
from shared.errors import InvalidArgument
from tests.storaged import support as T


def stack(blob_dir: Path, name: str) -> list[dict]:
    return [T.write_blob(blob_dir, [T.file("bin/base", b"base" * 500, mode=0o755)]).spec(),
            T.write_blob(blob_dir, [T.file(name, name.encode())]).spec()]


async def layer_ids(storaged) -> set[str]:
    return {r["chain_id"] for r in await storaged.list_layers()}


async def test_leased_layers_survive_collection_until_released(storaged, blob_dir):
    unpacked = await storaged.unpack(layers=stack(blob_dir, "a"), lease="pull 1", lease_seconds=300)
    other = await storaged.unpack(layers=stack(blob_dir, "b"))
    # No image lists either stack yet: only the lease keeps the first (and the base it shares).
    assert (await storaged.gc_layers(keep_top_layers=[]))["removed"] == [other["top_layer"]]
    assert await layer_ids(storaged) == set(unpacked["chain_ids"])

    assert await storaged.release_layers(lease="pull 1") == {"released": True}
    assert await storaged.release_layers(lease="pull 1") == {"released": False}
    assert sorted((await storaged.gc_layers(keep_top_layers=[]))["removed"]) == sorted(unpacked["chain_ids"])
    assert await layer_ids(storaged) == set()


async def test_a_lease_whose_holder_never_releases_it_runs_out(storaged, blob_dir):
    unpacked = await storaged.unpack(layers=stack(blob_dir, "a"), lease="pull of a dead frontend",
                                     lease_seconds=0.001)
    await asyncio.sleep(0.05)
    assert sorted((await storaged.gc_layers(keep_top_layers=[]))["removed"]) == sorted(unpacked["chain_ids"])


async def test_a_failed_unpack_keeps_no_lease(storaged, blob_dir):
    specs = stack(blob_dir, "a")
    with pytest.raises(InvalidArgument, match="diff_id"):
        await storaged.unpack(layers=[specs[0], {**specs[1], "diff_id": "sha256:" + "0" * 64}], lease="pull 2")
    assert await layer_ids(storaged) == set()
    assert not storaged._unpacks._leases


@pytest.mark.parametrize("lease, seconds", [("", 10), ("x" * 300, 10), ("ok", 0), ("ok", "soon")])
async def test_bad_leases_are_refused(storaged, blob_dir, lease, seconds):
    with pytest.raises(InvalidArgument):
        await storaged.unpack(layers=stack(blob_dir, "a"), lease=lease, lease_seconds=seconds)


async def test_an_unpack_waits_for_the_collection_deleting_the_same_layer(storaged, blob_dir, monkeypatch):
    specs = stack(blob_dir, "a")
    unpacked = await storaged.unpack(layers=specs)
    deleting, go_on = threading.Event(), threading.Event()
    real_remove = LayerStore.remove

    def slow_remove(self, record):  # a deletion that takes its time (a big layer)
        deleting.set()
        go_on.wait(30)
        real_remove(self, record)

    monkeypatch.setattr(LayerStore, "remove", slow_remove)
    collection = asyncio.ensure_future(storaged.gc_layers(keep_top_layers=[]))
    await asyncio.to_thread(deleting.wait, 30)
    # The layers are out of the records, their directories not yet out of layers/.
    unpack = asyncio.ensure_future(storaged.unpack(layers=specs))
    done, _ = await asyncio.wait({unpack}, timeout=2)
    assert not done or unpack.exception() is None, unpack.exception()
    go_on.set()
    removed = await collection
    assert sorted(removed["removed"]) == sorted(unpacked["chain_ids"])
    assert (await unpack)["chain_ids"] == unpacked["chain_ids"]
    # The stack is whole again: records, directories and short links agree.
    root = Path(storaged._root)
    assert await layer_ids(storaged) == set(unpacked["chain_ids"])
    assert sorted(os.listdir(root / "layers")) == sorted(c.split(":")[1] for c in unpacked["chain_ids"])
    for record in await storaged.list_layers():
        assert (root / "l" / record["link"] / ("bin/base" if record["parent"] is None else "a")).is_file()


async def test_a_lease_outlives_a_storaged_restart(storaged, config, blob_dir):
    from tests.storaged.test_restart import restarted

    unpacked = await storaged.unpack(layers=stack(blob_dir, "a"), lease="pull 3", lease_seconds=300)
    gone = await storaged.unpack(layers=stack(blob_dir, "c"), lease="pull of a dead frontend", lease_seconds=0.05)
    await asyncio.sleep(0.1)
    # No stop(): as if the process was killed in the middle of the pull.
    again = await restarted(config)
    try:
        # The lease that ran out meanwhile is gone; the other still spares its layers.
        assert (await again.gc_layers(keep_top_layers=[]))["removed"] == [gone["top_layer"]]
        assert await layer_ids(again) == set(unpacked["chain_ids"])
        assert await again.release_layers(lease="pull 3") == {"released": True}
        assert sorted((await again.gc_layers(keep_top_layers=[]))["removed"]) == sorted(unpacked["chain_ids"])
    finally:
        await again.stop()


async def test_an_unreadable_lease_table_keeps_no_lease(storaged, config, blob_dir):
    from services.storaged.layer_unpacks import LEASES_FILE
    from tests.storaged.test_restart import restarted

    unpacked = await storaged.unpack(layers=stack(blob_dir, "a"), lease="pull 4", lease_seconds=300)
    Path(storaged._layers.root, LEASES_FILE).write_text("{torn")
    again = await restarted(config)
    try:
        assert sorted((await again.gc_layers(keep_top_layers=[]))["removed"]) == sorted(unpacked["chain_ids"])
    finally:
        await again.stop()
    [aside] = Path(storaged._layers.root, "quarantine").glob("layer_leases-*")
    assert (aside / LEASES_FILE).read_text() == "{torn"
