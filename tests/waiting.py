"""Waiting on something observable instead of for a while."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

# How often a condition is checked: often enough that a wait ends moments after the condition
# holds, seldom enough not to load what is polled.
INTERVAL = 0.05


async def eventually(
    predicate: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0, what: str = "the condition"
) -> Any:
    """Until predicate() (a function or a coroutine function) returns something true; that value.

    Checked at once, then every INTERVAL s until timeout s have passed; then AssertionError naming
    what was waited for. Bounded in time and so in count (timeout / INTERVAL checks, plus one).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}, in vain")
        await asyncio.sleep(INTERVAL)
