"""`AsyncClient`: the balpm SDK for asyncio, with the same methods as `balpm.Client`.

    async with balpm.AsyncClient("127.0.0.1:50051") as client:
        await client.create_pool("demo")
        await client.upload_items("demo", items)
        async for pool in client.list_pools():
            ...

Every method of `Client` exists here with the same name, arguments and result; calls are
coroutines, and the iterating methods (list_pools, export_labels, export_items) return async
iterators. Both run the plans of `balpm._plans`, so their behaviour (deadlines, retries,
pagination, errors) is the same. The channel opens on the first call, in the event loop that makes
it; use one AsyncClient from one event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from balpm import _plans as plans
from balpm.client import Client, ClientBase
from balpm.errors import from_rpc_error
from balpm.messages import UploadSummary
from balpm.v1 import balpm_pb2 as pb

T = TypeVar("T")


class AsyncClient(ClientBase):
    """asyncio balpm client (arguments: see `balpm.client.ClientBase`)."""

    def _open_channel(self, target: str, creds: grpc.ChannelCredentials | None, opts: list[tuple[str, Any]]) -> Any:
        if creds is not None:
            return grpc.aio.secure_channel(target, creds, options=opts)
        return grpc.aio.insecure_channel(target, options=opts)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close()

    # ---- running plans ---------------------------------------------------------------------

    async def _execute(self, step: plans.Step) -> Any:
        try:
            if isinstance(step, plans.Read):
                msg = await step.stream.read()
                return None if msg is grpc.aio.EOF else msg
            if isinstance(step, plans.Upload):
                return await self._upload(step)
            if isinstance(step, plans.Sleep):
                return await asyncio.sleep(step.seconds)
            started = self._start(step)  # a unary call to await, or a stream to read
            return await started if isinstance(step, plans.Unary) else started
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    async def _upload(self, step: plans.Upload) -> Any:
        requests = step.requests
        call = self._method(step.method)(iter(requests), timeout=self._deadline(step.deadline), metadata=self._metadata)
        requests.cancel = call.cancel
        try:
            resp = await call
        except asyncio.CancelledError:
            if requests.error is None:
                raise  # not cancelled by `requests` itself
            resp = None
        except grpc.RpcError as e:
            return requests.outcome(None, from_rpc_error(e))
        return requests.outcome(resp)

    async def _run(self, plan: plans.Plan[T]) -> T:
        with plans.Stepper(plan) as stepper:
            for step in stepper:
                await stepper.settle_async(self._execute, step)
        return stepper.result  # type: ignore[return-value]

    async def _iterate(self, plan: plans.Plan[None]) -> AsyncIterator[Any]:
        with plans.Stepper(plan) as stepper:
            for step in stepper:
                if not isinstance(step, plans.Emit):
                    await stepper.settle_async(self._execute, step)
                    continue
                yield step.value

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        try:
            self._connect()
            await asyncio.wait_for(self._channel.channel_ready(), timeout_s)
        except asyncio.TimeoutError as e:
            raise self._unreachable(timeout_s) from e

    # ---- pools ---------------------------------------------------------------------------

    async def create_pool(self, pool_id: str, **settings: Any) -> pb.Pool:
        return await self._run(plans.create_pool(pool_id, settings))

    async def get_pool(self, pool_id: str) -> pb.Pool:
        return await self._run(plans.get_pool(pool_id))

    def list_pools(self, page_size: int = 100) -> AsyncIterator[pb.Pool]:
        return self._iterate(plans.list_pools(page_size))

    async def delete_pool(self, pool_id: str) -> None:
        await self._run(plans.delete_pool(pool_id))

    async def wait_pool_ready(
        self,
        pool_id: str,
        *,
        timeout_s: float = 3600.0,
        poll_s: float = 0.5,
        progress: Callable[[pb.Pool], None] | None = None,
    ) -> pb.Pool:
        return await self._run(plans.wait_pool_ready(pool_id, timeout_s, poll_s, progress))

    # ---- items and labels ----------------------------------------------------------------

    async def upload_items(
        self,
        pool_id: str,
        items: Iterable[Mapping[str, Any] | pb.Item],
        *,
        chunk_size: int = 500,
        progress: Callable[[int], None] | None = None,
        timeout_s: float | None = None,
    ) -> UploadSummary:
        return await self._run(plans.upload_items(pool_id, items, chunk_size, progress, timeout_s))

    async def ingest_labels(
        self, pool_id: str, labels: Iterable[Mapping[str, Any] | pb.Label], *, request_id: str = ""
    ) -> pb.IngestLabelsResponse:
        return await self._run(plans.ingest_labels(pool_id, labels, request_id))

    def export_labels(
        self, pool_id: str, *, page_size: int = 1000, page_token: str = ""
    ) -> AsyncIterator[pb.ExportedLabel]:
        return self._iterate(plans.export_labels(pool_id, page_size, page_token))

    def export_items(
        self,
        pool_id: str,
        *,
        include_features: bool = False,
        split: str | int | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> AsyncIterator[pb.Item]:
        return self._iterate(plans.export_items(pool_id, include_features, split, page_size, page_token))

    async def release_items(self, pool_id: str, item_ids: Sequence[str], annotator_id: str = "") -> int:
        return await self._run(plans.release_items(pool_id, item_ids, annotator_id))

    async def exclude_items(
        self, pool_id: str, item_ids: Sequence[str], *, include: bool = False
    ) -> pb.ExcludeItemsResponse:
        return await self._run(plans.exclude_items(pool_id, item_ids, include))

    async def update_item_scores(self, pool_id: str, scores: Mapping[str, Mapping[str, float]]) -> int:
        return await self._run(plans.update_item_scores(pool_id, scores))

    # ---- training ------------------------------------------------------------------------

    async def update_posterior(
        self,
        pool_id: str,
        *,
        seed: int = 0,
        warm_start: bool = False,
        epochs: int = 0,
        wait: bool = True,
        progress: Callable[[pb.Operation], None] | None = None,
        timeout_s: float = 3600.0,
    ) -> pb.Operation:
        return await self._run(plans.update_posterior(pool_id, seed, warm_start, epochs, wait, progress, timeout_s))

    async def wait_operation(
        self, operation_id: str, *, progress: Callable[[pb.Operation], None] | None = None, timeout_s: float = 3600.0
    ) -> pb.Operation:
        return await self._run(plans.wait_operation(operation_id, progress, timeout_s))

    async def get_operation(self, operation_id: str) -> pb.Operation:
        return await self._run(plans.get_operation(operation_id))

    async def cancel_operation(self, operation_id: str) -> pb.Operation:
        return await self._run(plans.cancel_operation(operation_id))

    # ---- acquisition and prediction ------------------------------------------------------

    async def acquire(
        self,
        pool_id: str,
        *,
        batch_size: int,
        strategy: str | int | None = None,
        seed: int = 0,
        lease_ttl_s: float = 0.0,
        annotator_id: str = "",
        **options: float,
    ) -> pb.AcquireBatchResponse:
        return await self._run(plans.acquire(pool_id, batch_size, strategy, seed, lease_ttl_s, annotator_id, options))

    async def predict(
        self, pool_id: str, item_ids: Sequence[str] = (), items: Iterable[Mapping[str, Any] | pb.Item] = ()
    ) -> pb.PredictResponse:
        return await self._run(plans.predict(pool_id, item_ids, items))

    async def evaluate(
        self, pool_id: str, items: Iterable[tuple[Mapping[str, Any] | pb.Item, str]] = ()
    ) -> pb.EvaluateResponse:
        return await self._run(plans.evaluate(pool_id, items))

    async def learning_curve(
        self, pool_id: str, *, next_batch_size: int = 0, wait: bool = False, timeout_s: float = 600.0,
        poll_s: float = 1.0,
    ) -> pb.GetLearningCurveResponse:
        return await self._run(plans.learning_curve(pool_id, next_batch_size, wait, timeout_s, poll_s))


def _share_docs() -> None:
    """Give every public AsyncClient method the docstring of its Client twin (written once, there)."""
    for name, member in vars(AsyncClient).items():
        twin = getattr(Client, name, None)
        if callable(member) and not name.startswith("_") and member.__doc__ is None and twin is not None:
            member.__doc__ = twin.__doc__


_share_docs()

__all__ = ["AsyncClient"]
