"""Waiting in tests: poll a condition under a deadline instead of sleeping and hoping.

    wait_until(lambda: proc.poll() is not None, 10, "the server to exit after SIGTERM")

fails with `AssertionError: timed out after 10 s waiting for the server to exit after SIGTERM`
(plus the last exception the predicate raised, if any) instead of passing or failing by luck
of timing; `run_within(coro, timeout_s, what)` does the same for a coroutine that must not hang.
The deadline is a bound on a hang, not a measurement: set it generously.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.02,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns something truthy; return that value.

    Args:
        predicate: The condition; called at least once, even with timeout_s <= 0.
        timeout_s: Deadline in seconds from the first call.
        what: What is awaited, for the failure message ("the RPC to be in flight").
        interval_s: Pause between calls (doubles up to 0.25 s).
        ignore: Exception types from `predicate` that count as "not yet" (the last one is
            reported on timeout); any other exception propagates at once.

    Returns:
        The first truthy value `predicate` returned.

    Raises:
        AssertionError: The deadline passed first.
    """
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as e:
            last_error = e
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{detail}")
        time.sleep(interval_s)
        interval_s = min(interval_s * 2, 0.25)


def run_within(coro: Coroutine[Any, Any, T], timeout_s: float, what: str) -> T:
    """`asyncio.run(coro)`, cancelled with a clear AssertionError if it takes over `timeout_s` (a hang)."""

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(coro, timeout_s)
        except asyncio.TimeoutError:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}") from None

    return asyncio.run(bounded())
