"""The gRPC servicer: validate enums, convert, one domain call, convert back.

Methods raise domain errors; the server interceptor maps them (and anything else) to a
status for every method (`balpm_server.transport.status`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import grpc

from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc
from balpm_server import errors
from balpm_server.domain import models as m
from balpm_server.domain import validation as v
from balpm_server.domain.common import DEFAULT_TENANT
from balpm_server.domain.service import PoolService
from balpm_server.transport import convert as c

log = logging.getLogger(__name__)
RELEASE_CHUNK = 1_000  # item ids per release_items call when taking back an undelivered batch

CURRENT_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("balpm_tenant", default=DEFAULT_TENANT)


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's tenant, as set by authentication (the default tenant without auth)."""
    del context
    return CURRENT_TENANT.get()


class BalpmServicer(pb_grpc.BalpmServiceServicer):
    """Implements balpm.v1.BalpmService over a `PoolService`."""

    def __init__(self, service: PoolService) -> None:
        self.service = service
        s = service.settings
        # The largest AcquireBatch reply sent: the configured cap, never above gRPC's own
        # send limit (max_message_bytes); None when neither is set (<= 0 = unlimited).
        limits = {"max_acquire_reply_bytes": s.max_acquire_reply_bytes, "max_message_bytes": s.max_message_bytes}
        caps = sorted((b, name) for name, b in limits.items() if b > 0)
        self.max_acquire_reply_bytes: int | None = caps[0][0] if caps else None
        self.acquire_reply_cap_setting = caps[0][1] if caps else ""

    async def CreatePool(
        self, request: pb.CreatePoolRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreatePoolResponse:
        info = await self.service.create_pool(
            tenant_of(context), request.pool_id, c.pool_settings_from_pb(request.settings)
        )
        return pb.CreatePoolResponse(pool=c.pool_to_pb(info))

    async def GetPool(self, request: pb.GetPoolRequest, context: grpc.aio.ServicerContext) -> pb.GetPoolResponse:
        return pb.GetPoolResponse(pool=c.pool_to_pb(await self.service.get_pool(tenant_of(context), request.pool_id)))

    async def ListPools(self, request: pb.ListPoolsRequest, context: grpc.aio.ServicerContext) -> pb.ListPoolsResponse:
        infos, token = await self.service.list_pools(tenant_of(context), request.page_size, request.page_token)
        return pb.ListPoolsResponse(pools=[c.pool_to_pb(i) for i in infos], next_page_token=token)

    async def DeletePool(
        self, request: pb.DeletePoolRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeletePoolResponse:
        await self.service.delete_pool(tenant_of(context), request.pool_id)
        return pb.DeletePoolResponse()

    async def UploadItems(
        self, request_iterator: AsyncIterator[pb.UploadItemsRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadItemsResponse:
        stream = request_iterator.__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise errors.InvalidArgument("the stream is empty; send a header first", field="header") from None
        if first.WhichOneof("payload") != "header":
            raise errors.InvalidArgument("the first message must be a header", field="header", reason="MISSING_HEADER")
        offset = 0

        async def chunks() -> AsyncIterator[Sequence[m.ItemIn]]:
            nonlocal offset
            async for msg in stream:
                if msg.WhichOneof("payload") != "chunk":
                    raise errors.InvalidArgument("only the first message may be a header", field="header")
                converted = [c.item_from_pb(it, f"items[{offset + i}]") for i, it in enumerate(msg.chunk.items)]
                offset += len(converted)
                yield converted

        result, info = await self.service.upload_items(tenant_of(context), first.header.pool_id, chunks())
        return pb.UploadItemsResponse(
            accepted_count=result.accepted_count,
            duplicate_count=result.duplicate_count,
            rejections=[c.rejection_to_pb(r) for r in result.rejections],
            pool=c.pool_to_pb(info),
        )

    async def IngestLabels(
        self, request: pb.IngestLabelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestLabelsResponse:
        labels = [
            m.LabelIn(
                lb.label_id, lb.item_id, c.preference_from_pb(lb.preference, f"labels[{i}].preference"),
                lb.annotator_id, lb.replaces_label_id,
            )
            for i, lb in enumerate(request.labels)
        ]
        r = await self.service.ingest_labels(tenant_of(context), request.pool_id, labels, request.request_id)
        return pb.IngestLabelsResponse(
            stored_count=r.stored_count,
            duplicate_count=r.duplicate_count,
            label_count=r.label_count,
            auto_update_operation_id=r.auto_update_operation_id,
        )

    async def UpdatePosterior(
        self, request: pb.UpdatePosteriorRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdatePosteriorResponse:
        op = await self.service.update_posterior(
            tenant_of(context),
            request.pool_id,
            seed=request.seed,
            warm_start=request.warm_start,
            epochs=request.epochs,
        )
        return pb.UpdatePosteriorResponse(operation=c.operation_to_pb(op))

    async def GetOperation(
        self, request: pb.GetOperationRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetOperationResponse:
        op = await self.service.get_operation(tenant_of(context), request.operation_id)
        return pb.GetOperationResponse(operation=c.operation_to_pb(op))

    async def WatchOperation(
        self, request: pb.WatchOperationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchOperationResponse]:
        async for op in self.service.watch_operation(tenant_of(context), request.operation_id):
            yield pb.WatchOperationResponse(operation=c.operation_to_pb(op))

    async def CancelOperation(
        self, request: pb.CancelOperationRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelOperationResponse:
        op = await self.service.cancel_operation(tenant_of(context), request.operation_id)
        return pb.CancelOperationResponse(operation=c.operation_to_pb(op))

    async def AcquireBatch(
        self, request: pb.AcquireBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcquireBatchResponse:
        tenant = tenant_of(context)
        r = await self.service.acquire(
            tenant,
            request.pool_id,
            batch_size=request.batch_size,
            strategy=c.strategy_from_pb(request.strategy),
            seed=request.seed,
            lease_ttl_s=request.lease_ttl_s,
            annotator_id=request.annotator_id,
            options=c.options_from_pb(request.options),
        )
        # From here on the items are leased: a reply that is not sent must take them back.
        try:
            response = self._acquire_response(r)
            too_large = reply_too_large(response, self.max_acquire_reply_bytes, self.acquire_reply_cap_setting)
            if too_large is not None:
                raise too_large
        except Exception:
            ids = [a.item.item_id for a in r.items]
            # Shielded: a cancelled call (client deadline) must not cut the release short.
            await asyncio.shield(self._release_undelivered(tenant, request.pool_id, ids, request.annotator_id))
            raise
        return response

    @staticmethod
    def _acquire_response(r: m.AcquireResult) -> pb.AcquireBatchResponse:
        return pb.AcquireBatchResponse(
            items=[
                pb.AcquiredItem(
                    item=c.item_text_to_pb(a.item),
                    scores=pb.ScoreComponents(total=a.total, epistemic=a.epistemic, entropy=a.entropy),
                    rank=a.rank,
                    control=a.control,
                )
                for a in r.items
            ],
            posterior_version=r.posterior_version,
            strategy=c.STRATEGY_TO_PB[r.strategy],
            lease_expire_time=c.timestamp(r.lease_expire_time_s),
            acquire_s=r.acquire_s,
        )

    async def _release_undelivered(self, tenant: str, pool_id: str, item_ids: list[str], annotator_id: str) -> None:
        """End the leases an AcquireBatch call took when its reply will not be sent.

        The domain never hands an annotator an item it already leases, so releasing the
        batch's items for that annotator ends exactly this call's leases. The annotator is
        normalised as the domain did it ("" -> "anonymous"): "" would end everyone's.
        """
        try:
            annotator = v.annotator_id(annotator_id, "annotator_id")
            for i in range(0, len(item_ids), RELEASE_CHUNK):  # ReleaseItems' own per-call bound
                await self.service.release_items(tenant, pool_id, item_ids[i : i + RELEASE_CHUNK], annotator)
        except Exception:  # e.g. the pool was deleted meanwhile; the caller's error still goes out
            log.exception("could not release the leases of an undelivered AcquireBatch reply", extra={"pool": pool_id})

    async def ReleaseItems(
        self, request: pb.ReleaseItemsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseItemsResponse:
        n = await self.service.release_items(
            tenant_of(context), request.pool_id, list(request.item_ids), request.annotator_id
        )
        return pb.ReleaseItemsResponse(released_count=n)

    async def ExcludeItems(
        self, request: pb.ExcludeItemsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExcludeItemsResponse:
        changed, excluded = await self.service.exclude_items(
            tenant_of(context), request.pool_id, list(request.item_ids), include=request.include
        )
        return pb.ExcludeItemsResponse(changed_count=changed, excluded_count=excluded)

    async def UpdateItemScores(
        self, request: pb.UpdateItemScoresRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateItemScoresResponse:
        scores = []
        for i, s in enumerate(request.scores):
            apl = c.apl_from_pb(pb.Item(apl_scores=s.apl_scores)) if s.HasField("apl_scores") else None
            if apl is None:
                raise errors.InvalidArgument(f"scores[{i}].apl_scores is required", field=f"scores[{i}].apl_scores")
            scores.append((s.item_id, apl))
        n = await self.service.update_item_scores(tenant_of(context), request.pool_id, scores)
        return pb.UpdateItemScoresResponse(updated_count=n)

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        items = [c.item_from_pb(it, f"items[{i}]") for i, it in enumerate(request.items)]
        preds, version = await self.service.predict(tenant_of(context), request.pool_id, list(request.item_ids), items)
        return pb.PredictResponse(
            predictions=[
                pb.Prediction(
                    item_id=p.item_id,
                    prob_a=p.prob_a,
                    epistemic=p.epistemic,
                    aleatoric=p.aleatoric,
                    member_probs=list(p.member_probs),
                )
                for p in preds
            ],
            posterior_version=version,
        )

    async def Evaluate(self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        items = [
            (c.item_from_pb(li.item, f"items[{i}].item"), c.preference_from_pb(li.preference, f"items[{i}].preference"))
            for i, li in enumerate(request.items)
        ]
        e = await self.service.evaluate(tenant_of(context), request.pool_id, items)
        return pb.EvaluateResponse(
            log_likelihood=e.log_likelihood,
            accuracy=e.accuracy,
            brier=e.brier,
            ece=e.ece,
            mean_epistemic=e.mean_epistemic,
            count=e.count,
            posterior_version=e.posterior_version,
        )

    async def ExportLabels(
        self, request: pb.ExportLabelsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExportLabelsResponse]:
        async for page, token in self.service.export_labels(
            tenant_of(context), request.pool_id, request.page_size, request.page_token
        ):
            yield pb.ExportLabelsResponse(
                labels=[
                    pb.ExportedLabel(
                        label=pb.Label(
                            label_id=lb.label_id,
                            item_id=lb.item_id,
                            preference=c.PREF_TO_PB[lb.preference],
                            annotator_id=lb.annotator_id,
                            replaces_label_id=lb.replaces,
                        ),
                        item=pb.Item(**cast(dict[str, Any], texts)),
                        create_time=c.timestamp(lb.create_time_s),
                        control=lb.control,
                        superseded_by=lb.superseded_by,
                    )
                    for lb, texts in page
                ],
                next_page_token=token,
            )


    async def GetLearningCurve(
        self, request: pb.GetLearningCurveRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLearningCurveResponse:
        report = await self.service.learning_curve(tenant_of(context), request.pool_id, request.next_batch_size)
        return c.learning_curve_to_pb(report)

    async def ExportItems(
        self, request: pb.ExportItemsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExportItemsResponse]:
        split = c.split_from_pb(request.split)
        async for page, token in self.service.export_items(
            tenant_of(context),
            request.pool_id,
            request.page_size,
            request.page_token,
            include_features=request.include_features,
            split=split,
        ):
            yield pb.ExportItemsResponse(items=[c.exported_item_to_pb(e) for e in page], next_page_token=token)

def _varint_bytes(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def reply_too_large(
    response: pb.AcquireBatchResponse, limit_bytes: int | None, setting: str = "max_acquire_reply_bytes"
) -> errors.ResourceExhausted | None:
    """The error for an AcquireBatch reply over `limit_bytes` (None when it fits or there is no limit).

    `setting` names the server setting the limit comes from, for the message.

    The suggested batch_size is what would fit at this reply's mean bytes per item (an
    estimate: another batch's items may be longer or shorter).
    """
    size = response.ByteSize()
    if limit_bytes is None or size <= limit_bytes:
        return None
    n = len(response.items)
    # Each item travels as tag (1 byte for field 1) + length varint + message.
    per_item = [1 + _varint_bytes(b) + b for b in (a.ByteSize() for a in response.items)]
    base = size - sum(per_item)
    mean = sum(per_item) / n if n else float(size)
    fit = max(0, min(n - 1, int((limit_bytes - base) // mean))) if limit_bytes > base else 0
    what = (
        f"the AcquireBatch reply for batch_size {n} is {size} bytes, over the server's limit of "
        f"{limit_bytes} bytes ({setting})"
    )
    if fit >= 1:
        advice = f"lower batch_size to {fit} or less (items average {mean:.0f} bytes)"
    else:
        advice = (
            f"items average {mean:.0f} bytes, more than fits in one reply: try batch_size 1, or ask the "
            f"operator to raise BALPM_{setting.upper()} (and the clients' max receive message length)"
        )
    return errors.ResourceExhausted(
        f"{what}; none of its items stay leased: {advice}",
        field="batch_size",
        reason="REPLY_TOO_LARGE",
        metadata={
            "reply_bytes": str(size),
            "limit_bytes": str(limit_bytes),
            "batch_size": str(n),
            "suggested_batch_size": str(fit),
            "mean_item_bytes": str(round(mean)),
        },
    )
