"""Awaiting several steps at once, none left running behind a failure."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable


async def together(*steps: Awaitable[Any]) -> list[Any]:
    """Run steps at the same time; their results in order.

    Every step ends before a failure is raised (the earliest step's failure first), so
    that whatever follows, an undo above all, never runs beside a step still at work.
    """
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
