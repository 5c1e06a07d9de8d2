"""Locks per key: work on one key is serialised, on two keys it is not, and unused locks go away."""

from __future__ import annotations

import asyncio

from shared.keyed_locks import KeyedLocks


async def test_one_key_at_a_time_other_keys_free_and_nothing_kept() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    release = asyncio.Event()

    async def hold(key: str, name: str) -> None:
        async with locks.hold(key):
            order.append(name)
            await release.wait()

    first = asyncio.create_task(hold("a", "first"))
    second = asyncio.create_task(hold("a", "second"))
    await asyncio.sleep(0)
    async with locks.hold("b"):
        order.append("other key")
    assert order == ["first", "other key"]
    release.set()
    await asyncio.gather(first, second)
    assert order == ["first", "other key", "second"]
    assert len(locks) == 0
