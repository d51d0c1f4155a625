"""Waiting in tests: poll a condition until it holds, and fail, saying what was awaited, at a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def until(check: Callable[[], object], *, what: str, timeout_s: float = 20, every_s: float = 0.01) -> None:
    """Return once `check()` is true; AssertionError naming `what` once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


async def until_async(
    check: Callable[[], Awaitable[object]], *, what: str, timeout_s: float = 20, every_s: float = 0.01
) -> None:
    """`until` for a condition read by awaiting, without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(every_s)
