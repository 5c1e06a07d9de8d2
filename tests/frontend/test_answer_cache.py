"""ImageFsInfo and stats answers: reused for the same request while nothing changed, within their time."""

from __future__ import annotations

import pytest

from services.frontend import answer_cache
from services.frontend.answer_cache import AnswerCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_an_answer_is_reused_until_something_changes_or_its_time_is_up(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(answer_cache.time, "monotonic", clock)
    version = [1]
    cache = AnswerCache(1.0, lambda: tuple(version))
    computed: list[str] = []

    async def compute(key: str):  # type: ignore[no-untyped-def]
        computed.append(key)
        return f"{key}#{len(computed)}"

    assert await cache.get("a", lambda: compute("a")) == "a#1"
    assert await cache.get("a", lambda: compute("a")) == "a#1"  # reused
    assert await cache.get("b", lambda: compute("b")) == "b#2"  # another request
    version[0] = 2  # a pod, container or image changed
    assert await cache.get("a", lambda: compute("a")) == "a#3"
    clock.now += 0.5
    assert await cache.get("a", lambda: compute("a")) == "a#3"
    clock.now += 0.6  # past its time
    assert await cache.get("a", lambda: compute("a")) == "a#4"
    assert computed == ["a", "b", "a", "a"]


async def test_a_change_while_computing_is_not_hidden() -> None:
    version = [1]
    cache = AnswerCache(60.0, lambda: tuple(version))

    async def compute_while_changing() -> str:
        version[0] += 1  # e.g. a container made while the disks were measured
        return f"v{version[0]}"

    assert await cache.get("k", compute_while_changing) == "v2"
    assert await cache.get("k", compute_while_changing) == "v3"


async def test_no_reuse_when_the_time_is_zero() -> None:
    cache = AnswerCache(0, lambda: ())
    answers = iter(range(10))

    async def compute() -> int:
        return next(answers)

    assert [await cache.get("k", compute) for _ in range(3)] == [0, 1, 2]
