"""The domain facade: every RPC is one call here, whatever the transport.

`PoolService` is thin on purpose: it wires the stores to the modules that own the
work and hands each call to one of them, so a request walks downward:

* `pools`: create, look up (tenant-scoped), list and delete pools;
* `uploads`: item uploads (dedup, durable chunks) and server-side featurisation;
* `labels`: label ingestion (idempotent), ExportLabels and ExportItems;
* `training`: UpdatePosterior operations and their registry (get, watch, cancel);
* `acquiring`: AcquireBatch, leases, ReleaseItems and item scores;
* `inference`: Predict and Evaluate;
* `runtime`: the per-pool in-memory cache they share (items, features, posterior,
  BALD scores, kNN graph).

Methods raise only `balpm_server.errors` types on purpose.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Sequence

from balpm_server.acquisition import Strategy
from balpm_server.domain.acquiring import Acquisition
from balpm_server.domain.cluster import Cluster, check_cluster_settings
from balpm_server.domain.common import DEFAULT_TENANT
from balpm_server.domain.group_commit import GroupCommit
from balpm_server.domain.inference import Inference
from balpm_server.domain.labels import Labels
from balpm_server.domain.learning_curve import CurveReport, LearningCurves
from balpm_server.domain.models import (
    AcquireResult,
    AplScores,
    EvaluationOut,
    ExportedItem,
    IngestResult,
    ItemIn,
    ItemText,
    LabelIn,
    LabelWrite,
    LeaseRequest,
    Operation,
    PoolInfo,
    PoolSettings,
    PredictionOut,
    Preference,
    Split,
    StoredLabel,
    UploadResult,
)
from balpm_server.domain.pool_runtime import PoolRuntime
from balpm_server.domain.pools import Pools
from balpm_server.domain.runtime import RuntimeCache
from balpm_server.domain.training import Training
from balpm_server.domain.uploads import Featurizer, Uploads
from balpm_server.features import FeatureExtractor
from balpm_server.settings import Settings
from balpm_server.storage import open_store
from balpm_server.storage.artifacts import open_artifact_store

__all__ = ["DEFAULT_TENANT", "PoolService"]


class PoolService:
    """Acquisition service domain.

    Args:
        settings: Server settings.
        extractor: Feature extractor for FEATURE_SOURCE_SERVER pools (None disables them).
    """

    def __init__(self, settings: Settings, extractor: FeatureExtractor | None) -> None:
        check_cluster_settings(settings)
        self.settings = settings
        self.extractor = extractor
        self.root = settings.data_path
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = open_store(settings.database_url, self.root, connect_timeout_s=settings.database_connect_timeout_s)
        try:
            artifacts = open_artifact_store(
                settings.artifact_url, cache_dir=self.root / "artifact-cache",
                cache_max_bytes=settings.artifact_cache_bytes,
            )
        except BaseException:
            self.store.close()
            raise
        self._cache = RuntimeCache(settings, self.store, artifacts)
        self._pools = Pools(settings, self.store, self._cache, extractor)
        self._featurizer = Featurizer(settings, self.store, self._cache, extractor)
        self._uploads = Uploads(settings, self.store, self._pools, self._cache, self._featurizer)
        self._labels = Labels(self.store, self._pools, self._cache)
        self._training = Training(settings, self.store, self._pools, self._cache)
        self._acquisition = Acquisition(settings, self.store, self._pools, self._cache)
        self._inference = Inference(settings, self._pools, self._cache, extractor)
        self._curves = LearningCurves(settings, self.store, self._pools, self._cache)
        self.cluster: Cluster | None = None
        self._auto_pools: dict[str, tuple[str, str] | None] = {}  # pool key -> (tenant, name) if it has a policy
        if settings.cluster:
            self.cluster = Cluster(
                settings, self.store, self._cache, self._training, self._featurizer, auto_update=self._auto_update
            )
            self._training.may_run = self.cluster.owns
        self.ready = False

    # ---- internals tests look at -------------------------------------------------------

    @property
    def _runtimes(self) -> dict[str, PoolRuntime]:
        return self._cache.runtimes

    def _runtime(self, key: str) -> PoolRuntime:
        return self._cache.runtime(key)

    @property
    def _leases(self) -> GroupCommit[LeaseRequest, dict[str, ItemText]]:
        return self._acquisition.leases

    @property
    def _label_writes(self) -> GroupCommit[LabelWrite, None]:
        return self._labels.writes

    @property
    def _operations(self) -> dict[str, Operation]:
        return self._training.operations

    @property
    def _op_events(self) -> dict[str, asyncio.Event]:
        return self._training.op_events

    @property
    def _cancel_flags(self) -> dict[str, threading.Event]:
        return self._training.cancel_flags

    @property
    def _training_tasks(self) -> dict[str, asyncio.Task[None]]:
        return self._training.tasks

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self, address: str = "") -> None:
        """Restore state: fail interrupted operations, resume featurisation.

        In cluster mode that happens per pool, as this replica takes pools over: it joins
        the cluster at `address` (host:port the other replicas dial) instead.
        """
        if self.cluster is not None:
            await self.cluster.start(address)
        else:
            await self._training.fail_interrupted()
            await self._featurizer.resume()
        self.ready = True

    async def drain(self) -> None:
        """Cluster mode: hand every owned pool to another replica (before the server stops serving)."""
        if self.cluster is not None and not self.cluster.draining:
            await self.cluster.drain()

    async def _auto_update(self, key: str) -> None:
        """The automatic update policy of an owned pool (labels may have come in through other replicas).

        Called every cluster tick for every owned pool: whether a pool has a policy is read once
        (pool settings never change), so pools without one cost no query afterwards.
        """
        if key not in self._auto_pools:
            info = await self.store.call(self.store.pool_info, key, counts=False)
            if info is None:
                return
            policy = info.settings.auto_update_min_labels or info.settings.auto_update_interval_s
            self._auto_pools[key] = (info.tenant, info.pool_id) if policy else None
        named = self._auto_pools[key]
        if named is not None:
            await self._training.maybe_auto_update(*named)

    async def close(self) -> None:
        """Stop background work and close storage."""
        self.ready = False
        await self.drain()
        await self._training.stop()  # they stop at the next epoch boundary and record CANCELLED
        await self._featurizer.stop()
        await self._curves.stop()
        await self._cache.stop()
        self._training.closed = True
        if self.extractor is not None:
            await self.extractor.close()
        self.store.close()

    # ---- pools -------------------------------------------------------------------------

    async def create_pool(self, tenant: str, pool_id: str, settings: PoolSettings) -> PoolInfo:
        """Create a pool; fills the feature dim from the extractor for server features."""
        return await self._pools.create(tenant, pool_id, settings)

    async def get_pool(self, tenant: str, pool_id: str) -> PoolInfo:
        """Return one pool (with why its featurisation is paused, if it is)."""
        return self._with_pause(await self._pools.require(tenant, pool_id, counts=True))

    async def list_pools(self, tenant: str, page_size: int, page_token: str) -> tuple[list[PoolInfo], str]:
        """Return a page of pools in id order and the next page token."""
        page, token = await self._pools.list_page(tenant, page_size, page_token)
        return [self._with_pause(info) for info in page], token

    def _with_pause(self, info: PoolInfo) -> PoolInfo:
        pause = self._featurizer.pause_of(info.key)
        return info if pause is None else dataclasses.replace(info, featurization_pause=pause)

    async def delete_pool(self, tenant: str, pool_id: str) -> None:
        """Delete a pool and all its data (its featurisation and training stop first)."""
        info = await self._pools.require(tenant, pool_id)
        self._featurizer.cancel(info.key)
        self._training.cancel_pool(info.key)
        self._curves.forget(info.key)
        self._auto_pools.pop(info.key, None)
        await self._pools.delete(info)
        if self.cluster is not None:
            self.cluster.forget_pool(tenant, pool_id, info.key)

    # ---- items and labels --------------------------------------------------------------

    async def upload_items(
        self, tenant: str, pool_id: str, chunks: AsyncIterator[Sequence[ItemIn]]
    ) -> tuple[UploadResult, PoolInfo]:
        """Store streamed items; per-item problems are reported, not fatal."""
        return await self._uploads.upload(tenant, pool_id, chunks)

    async def ingest_labels(
        self, tenant: str, pool_id: str, labels: Sequence[LabelIn], request_id: str = ""
    ) -> IngestResult:
        """Store labels atomically and idempotently; acknowledged only after commit.

        Then the pool's automatic update policy may start UpdatePosterior (its id is in the result).
        """
        result = await self._labels.ingest(tenant, pool_id, labels, request_id)
        op_id = await self._training.maybe_auto_update(tenant, pool_id)
        return dataclasses.replace(result, auto_update_operation_id=op_id) if op_id else result

    def export_labels(
        self, tenant: str, pool_id: str, page_size: int, page_token: str
    ) -> AsyncIterator[tuple[list[tuple[StoredLabel, dict[str, str]]], str]]:
        """Yield pages of (label, item texts) with the token that resumes after each page."""
        return self._labels.export_labels(tenant, pool_id, page_size, page_token)

    def export_items(
        self,
        tenant: str,
        pool_id: str,
        page_size: int,
        page_token: str,
        *,
        include_features: bool = False,
        split: Split | None = None,
    ) -> AsyncIterator[tuple[list[ExportedItem], str]]:
        """Yield pages of items in upload order with the token that resumes after each page."""
        return self._labels.export_items(
            tenant, pool_id, page_size, page_token, include_features=include_features, split=split
        )

    # ---- training ----------------------------------------------------------------------

    async def update_posterior(
        self, tenant: str, pool_id: str, *, seed: int, warm_start: bool, epochs: int
    ) -> Operation:
        """Start retraining the posterior; ABORTED if one is already running for the pool."""
        return await self._training.start(tenant, pool_id, seed=seed, warm_start=warm_start, epochs=epochs)

    async def get_operation(self, tenant: str, operation_id: str) -> Operation:
        """Return an operation's current state."""
        return await self._training.get(tenant, operation_id)

    def watch_operation(self, tenant: str, operation_id: str) -> AsyncIterator[Operation]:
        """Yield the operation now and after each change, until it is done."""
        return self._training.watch(tenant, operation_id)

    async def cancel_operation(self, tenant: str, operation_id: str) -> Operation:
        """Request cancellation (takes effect at the next epoch boundary)."""
        return await self._training.cancel(tenant, operation_id)

    # ---- acquisition -------------------------------------------------------------------

    async def acquire(
        self,
        tenant: str,
        pool_id: str,
        *,
        batch_size: int,
        strategy: Strategy | None,
        seed: int,
        lease_ttl_s: float,
        annotator_id: str,
        options: dict[str, float],
    ) -> AcquireResult:
        """Choose and lease the next batch."""
        return await self._acquisition.acquire(
            tenant,
            pool_id,
            batch_size=batch_size,
            strategy=strategy,
            seed=seed,
            lease_ttl_s=lease_ttl_s,
            annotator_id=annotator_id,
            options=options,
        )

    async def release_items(self, tenant: str, pool_id: str, item_ids: Sequence[str], annotator_id: str) -> int:
        """End leases on items; returns how many leases ended."""
        return await self._acquisition.release(tenant, pool_id, item_ids, annotator_id)

    async def exclude_items(
        self, tenant: str, pool_id: str, item_ids: Sequence[str], *, include: bool = False
    ) -> tuple[int, int]:
        """Exclude items from acquisition or include them again; returns (changed, excluded now)."""
        return await self._acquisition.exclude(tenant, pool_id, item_ids, include=include)

    async def update_item_scores(self, tenant: str, pool_id: str, scores: Sequence[tuple[str, AplScores]]) -> int:
        """Set APL log-probabilities of items."""
        return await self._acquisition.update_item_scores(tenant, pool_id, scores)

    # ---- prediction and evaluation -----------------------------------------------------

    async def predict(
        self, tenant: str, pool_id: str, item_ids: Sequence[str], items: Sequence[ItemIn]
    ) -> tuple[list[PredictionOut], int]:
        """Predict P(A preferred) with epistemic and aleatoric uncertainty."""
        return await self._inference.predict(tenant, pool_id, item_ids, items)

    async def evaluate(self, tenant: str, pool_id: str, items: Sequence[tuple[ItemIn, Preference]]) -> EvaluationOut:
        """Evaluate on given labelled items, or on the held-out split when none are given."""
        return await self._inference.evaluate(tenant, pool_id, items)

    async def learning_curve(self, tenant: str, pool_id: str, next_batch_size: int = 0) -> CurveReport:
        """The pool's latest savings estimate and stopping signal (a newer one computes in the background)."""
        return await self._curves.get(tenant, pool_id, next_batch_size)
