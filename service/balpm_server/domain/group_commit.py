"""Group commit: many concurrent callers, one worker-thread write per batch of them.

Under load, AcquireBatch calls arrive faster than one SQLite commit plus one thread
hop each can serve; queueing them and writing whatever has accumulated in one
transaction keeps the per-call cost flat (the classic database group commit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Batches `submit` calls into `flush` calls run in a worker thread, one at a time.

    Args:
        flush: Takes the requests of one batch and returns one result per request, in
            order. If it raises for a batch of several, each request is retried alone so
            one bad request cannot fail the others.
        max_batch: Most requests per `flush`.
        flush_now: Optional non-blocking variant of `flush`, tried first on the event
            loop: it returns None instead of waiting (e.g. when the store is busy), and
            only then is the batch handed to a worker thread. A thread hop costs more
            than a short write that would not have to wait.
    """

    def __init__(
        self,
        flush: Callable[[Sequence[T]], list[R]],
        max_batch: int = 256,
        flush_now: Callable[[Sequence[T]], list[R] | None] | None = None,
    ) -> None:
        self._flush = flush
        self._flush_now = flush_now
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, request: T) -> R:
        """Queue `request` and wait for its result (or its exception).

        The write goes ahead even if the caller is cancelled meanwhile, so what the
        caller sees never disagrees with what was stored.
        """
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            if not await self._settle(batch, alone=len(batch) == 1):
                for one in batch:
                    await self._settle([one], alone=True)

    async def _settle(self, batch: list[tuple[T, asyncio.Future[R]]], *, alone: bool) -> bool:
        """Flush `batch` and resolve its futures; False (nothing resolved) if a group write failed."""
        requests = [request for request, _ in batch]
        try:
            results = self._flush_now(requests) if self._flush_now is not None else None
            if results is None:
                results = await asyncio.to_thread(self._flush, requests)
        except Exception as e:  # handed to the waiting caller(s)
            if not alone:
                return False
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return True
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
        return True
