"""Waiting for a condition in an async test: polled against a deadline, never a fixed sleep, so that a slow
machine makes a test slower but not fail."""

from __future__ import annotations

import asyncio


async def until(cond, what: str, timeout: float = 20.0) -> None:
    """Returns once `cond()` is true; fails naming `what` if it is not within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
