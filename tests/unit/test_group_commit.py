"""Group commit: concurrent submits share flushes; one bad request fails alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from balpm_server.domain.group_commit import GroupCommit


def test_concurrent_submits_are_batched_and_answered_in_order():
    calls: list[list[int]] = []
    gate = threading.Event()

    def flush(reqs: Sequence[int]) -> list[int]:
        gate.wait(5)  # the first flush blocks until every other request has queued
        calls.append(list(reqs))
        return [r * 10 for r in reqs]

    async def main() -> list[int]:
        gc: GroupCommit[int, int] = GroupCommit(flush)
        tasks = [asyncio.ensure_future(gc.submit(i)) for i in range(20)]
        await asyncio.sleep(0.05)
        gate.set()
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(main()) == [i * 10 for i in range(20)]
    assert sorted(r for c in calls for r in c) == list(range(20))
    assert len(calls) < 20  # the ones that queued behind the first flush went together


def test_a_failing_request_fails_alone_and_flush_now_is_tried_first():
    seen_now: list[list[int]] = []

    def flush(reqs: Sequence[int]) -> list[int]:
        if 3 in reqs:
            raise ValueError("bad request 3")
        return list(reqs)

    def flush_now(reqs: Sequence[int]) -> list[int] | None:
        seen_now.append(list(reqs))
        return None  # "busy": hand over to the thread

    async def main() -> list[object]:
        gc: GroupCommit[int, int] = GroupCommit(flush, flush_now=flush_now)
        return list(await asyncio.gather(*(gc.submit(i) for i in range(6)), return_exceptions=True))

    out = asyncio.run(main())
    assert [o for i, o in enumerate(out) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(out[3], ValueError)
    assert seen_now == [[0, 1, 2, 3, 4, 5], [0], [1], [2], [3], [4], [5]]  # the group, then each alone


def test_a_cancelled_caller_does_not_cancel_the_write():
    written: list[int] = []
    started = threading.Event()
    release = threading.Event()

    def flush(reqs: Sequence[int]) -> list[int]:
        started.set()
        release.wait(5)
        written.extend(reqs)
        return list(reqs)

    async def main() -> None:
        gc: GroupCommit[int, int] = GroupCommit(flush)
        task = asyncio.ensure_future(gc.submit(7))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert await gc.submit(8) == 8

    asyncio.run(main())
    assert written == [7, 8]
