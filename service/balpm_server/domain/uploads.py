"""Uploads: validated, deduplicated, durable item chunks; then server-side featurisation.

`Uploads` stores streamed items chunk by chunk (features fsynced, then SQLite, before
the next chunk is read), idempotent by item id and content digest. `Featurizer` then
extracts the features of FEATURE_SOURCE_SERVER pools (and server-side APL scores) in
the background, resumable after a crash: SQLite marks rows done only after their
features are on disk.

Shapes: R rows of a chunk, D feature dim.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np

from balpm_server import errors
from balpm_server.domain import validation as v
from balpm_server.domain.common import digest
from balpm_server.domain.models import (
    AplScores,
    FeatureSource,
    FeatureStorage,
    FeaturizationPause,
    ItemAplScores,
    ItemIn,
    ItemRecord,
    PoolInfo,
    PoolState,
    Rejection,
    Split,
    UploadResult,
    server_apl,
)
from balpm_server.domain.pools import Pools
from balpm_server.domain.runtime import RuntimeCache
from balpm_server.features import FeatureExtractor
from balpm_server.settings import Settings
from balpm_server.storage import FeatureStore, SqlStore
from balpm_server.storage.faults import storage_error
from balpm_server.storage.feature_store import FLOAT16_MAX, FeatureOutOfRange

log = logging.getLogger(__name__)
RETRY_S = 5.0  # first retry of a failed featurisation; doubled per failure up to RETRY_MAX_S
RETRY_MAX_S = 60.0


def item_record(item: ItemIn, row: int, item_digest: str, client_features: bool) -> ItemRecord:
    """The stored record of an uploaded item (client features are stored with it)."""
    return ItemRecord(
        item_id=item.item_id,
        row=row,
        split=item.split,
        prompt=item.prompt,
        completion_a=item.completion_a,
        completion_b=item.completion_b,
        heldout_preference=item.heldout_preference,
        featurized=client_features,
        digest=item_digest,
        apl=item.apl,
    )


class Featurizer:
    """Background feature extraction of server-feature pools, one task per pool.

    Args:
        settings: Server settings.
        store: The metadata store.
        cache: The pools' runtimes and folders.
        extractor: The feature extractor (None: no server-feature pools exist).
    """

    def __init__(
        self, settings: Settings, store: SqlStore, cache: RuntimeCache, extractor: FeatureExtractor | None
    ) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.extractor = extractor
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pauses: dict[str, FeaturizationPause] = {}

    def pause_of(self, key: str) -> FeaturizationPause | None:
        """Why the pool's featurisation is paused (None while it runs or once done)."""
        return self._pauses.get(key)

    def _paused(self, key: str, reason: str, message: str) -> float:
        """Record a failed attempt; returns the seconds until the next one (capped exponential backoff)."""
        now = time.time()
        prior = self._pauses.get(key)
        attempts = 1 if prior is None else prior.attempts + 1
        delay_s = min(RETRY_MAX_S, RETRY_S * 2.0 ** (attempts - 1))
        self._pauses[key] = FeaturizationPause(
            reason=reason,
            message=message,
            paused_since_s=now if prior is None else prior.paused_since_s,
            next_retry_s=now + delay_s,
            attempts=attempts,
        )
        return delay_s

    async def resume(self) -> None:
        """Restart featurisation of every pool a previous process left FEATURIZING."""
        for key in await self.store.call(self.store.pool_keys):
            info = await self.store.call(self.store.pool_info, key, counts=False)
            if info is not None and info.state == PoolState.FEATURIZING:
                self.schedule(key)

    def schedule(self, key: str) -> None:
        """Featurise the pool's new rows in the background (once: a running task picks them up)."""
        task = self._tasks.get(key)
        if task is not None and not task.done():
            return
        self._tasks[key] = asyncio.get_running_loop().create_task(self._featurize(key))

    def running_in(self, key: str) -> bool:
        """Whether the pool's featurisation runs (or waits to retry) in this process."""
        task = self._tasks.get(key)
        return task is not None and not task.done()

    def cancel(self, key: str) -> None:
        """Stop featurising a pool (it is being deleted, or its ownership moved)."""
        task = self._tasks.pop(key, None)
        self._pauses.pop(key, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        """Cancel every featurisation task and wait for them."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _score_apl(self, info: PoolInfo) -> None:
        """Compute missing APL log-probabilities with the pool's policy and reference models."""
        from balpm_server.features.logprobs import apl_logprobs

        todo = await self.store.call(self.store.items_missing_apl, info.key)
        if not todo:
            return
        s = info.settings
        logp_N_4 = await asyncio.to_thread(
            apl_logprobs, s.apl_policy_model_path, s.apl_reference_model_path,
            [t.prompt for t in todo], [t.completion_a for t in todo], [t.completion_b for t in todo],
            device=self.settings.device,
        )
        scores = [ItemAplScores(t.item_id, AplScores(*(float(x) for x in logp_N_4[i]))) for i, t in enumerate(todo)]
        await self.store.call(self.store.update_apl_scores, info.key, scores)

    async def _featurize(self, key: str) -> None:
        """Extract features (and server-side APL scores) for new rows; resumable after a crash."""
        # One group = extract_batch_size items (3x as many texts, sorted by length inside the
        # extractor), committed before the next one: featurized_count advances group by group.
        batch = max(1, self.settings.extract_batch_size)
        try:
            while True:
                todo = await self.store.call(self.store.unfeaturized, key)
                if not todo:
                    break
                info = await self.store.call(self.store.pool_info, key)
                if info is None:
                    return
                assert self.extractor is not None
                fs = self.cache.features(info)
                for start in range(0, len(todo), batch):
                    part = todo[start : start + batch]
                    rows_R = np.array([t.row for t in part], dtype=np.int64)
                    prompts = [t.prompt for t in part]
                    texts_a = [t.prompt + t.completion_a for t in part]
                    texts_b = [t.prompt + t.completion_b for t in part]
                    feats = await self.extractor.embed(prompts + texts_a + texts_b)
                    n = len(part)
                    block = {"prompt": feats[:n], "a": feats[n : 2 * n], "b": feats[2 * n :]}
                    await self.cache.io(self._store_group, key, fs, rows_R, block)
                    self._pauses.pop(key, None)  # progress: no longer paused
                    if not server_apl(info):  # else rows join once they have their APL scores too
                        await self.cache.join_featurized(key, int(rows_R[-1]) + 1, done=False)
            info = await self.store.call(self.store.pool_info, key, counts=False)
            if info is not None and server_apl(info):
                await self._score_apl(info)
            await self.store.call(self.store.set_pool_state, key, PoolState.READY)
            await self.cache.join_featurized(key, 0, done=True)
            self.cache.schedule_graph(key)
        except asyncio.CancelledError:
            raise
        except errors.BalpmError as e:
            known = storage_error(e) or e
            delay_s = self._paused(key, known.reason, known.message)
            log.error("featurisation of pool %s paused: %s [%s]; retrying in %.0f s", key, known.message,
                      known.reason, delay_s)
            await self._retry_later(key, delay_s)
        except Exception as e:
            fault = storage_error(e)
            if fault is not None:
                delay_s = self._paused(key, fault.reason, fault.message)
            else:
                delay_s = self._paused(key, "FEATURIZATION_FAILED", "feature extraction failed (see the server log)")
            log.exception("featurisation of pool %s failed; retrying in %.0f s", key, delay_s)
            await self._retry_later(key, delay_s)
        else:
            self._pauses.pop(key, None)

    def _store_group(self, key: str, fs: FeatureStore, rows_R: np.ndarray, block: dict[str, np.ndarray]) -> None:
        """Make one featurisation group durable (file, then artifact object), then mark it featurised.

        Raises:
            errors.FailedPrecondition: An extracted value a float16 pool cannot hold (reason
                FEATURE_OUT_OF_RANGE; nothing of the group is stored, the featurisation pauses).
        """
        try:
            fs.write_rows(rows_R, block)  # checks the range before it writes anything
        except FeatureOutOfRange as e:
            raise errors.FailedPrecondition(
                f"the feature extractor returned {e.kind} features of rows {int(rows_R.min())}-{int(rows_R.max())} "
                f"with a value of magnitude {e.max_abs:.6g}, beyond the {FLOAT16_MAX:g} a "
                "FEATURE_STORAGE_FLOAT16 pool can store; this group was not stored",
                field="settings.feature_storage",
                reason="FEATURE_OUT_OF_RANGE",
            ) from None
        chunk = self.cache.artifacts.put_features(key, rows_R, block, dtype=fs.dtype)
        self.store.mark_featurized(key, rows_R.tolist(), chunk)

    async def _retry_later(self, key: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._tasks.pop(key, None)
        if await self.store.call(self.store.pool_exists, key):
            self.schedule(key)


class Uploads:
    """UploadItems.

    Args:
        settings: Server settings (chunk limit).
        store: The metadata store.
        pools: Pool lookups.
        cache: The pools' runtimes and folders.
        featurizer: Where server-feature pools' new rows go.
    """

    def __init__(
        self, settings: Settings, store: SqlStore, pools: Pools, cache: RuntimeCache, featurizer: Featurizer
    ) -> None:
        self.settings = settings
        self.store = store
        self.pools = pools
        self.cache = cache
        self.featurizer = featurizer

    @staticmethod
    def _check_item(
        item: ItemIn, index: int, dim: int, client_features: bool, float16: bool = False
    ) -> dict[str, np.ndarray]:
        prefix = f"items[{index}]"
        v.item_id(item.item_id, f"{prefix}.item_id")
        v.text(item.prompt, f"{prefix}.prompt")
        v.text(item.completion_a, f"{prefix}.completion_a")
        v.text(item.completion_b, f"{prefix}.completion_b")
        if item.split == Split.HELDOUT and item.heldout_preference is None:
            raise errors.InvalidArgument(
                f"{prefix}.heldout_preference is required for SPLIT_HELDOUT items",
                field=f"{prefix}.heldout_preference",
            )
        if item.apl is not None:
            v.apl_scores(item.apl, f"{prefix}.apl_scores")
        if not client_features:
            if not item.prompt:
                raise errors.InvalidArgument(f"{prefix}.prompt is empty", field=f"{prefix}.prompt")
            return {}
        return {
            "prompt": v.features(item.prompt_features, dim, f"{prefix}.prompt_features", float16=float16),
            "a": v.features(item.completion_a_features, dim, f"{prefix}.completion_a_features", float16=float16),
            "b": v.features(item.completion_b_features, dim, f"{prefix}.completion_b_features", float16=float16),
        }

    async def upload(
        self, tenant: str, pool_id: str, chunks: AsyncIterator[Sequence[ItemIn]]
    ) -> tuple[UploadResult, PoolInfo]:
        """Store streamed items; per-item problems are reported, not fatal.

        Each chunk is committed (features fsynced, then SQLite) before the next is read,
        so everything acknowledged survives a crash.
        """
        info = await self.pools.require(tenant, pool_id)
        key = info.key  # the stream is bound to this pool instance (see SqlStore.reserve_rows)
        client_features = info.settings.feature_source == FeatureSource.CLIENT
        dim = info.settings.feature_dim
        float16 = info.settings.feature_storage is FeatureStorage.FLOAT16
        # New rows wait for the Featurizer (server features, or APL scores the server computes).
        featurizing = not client_features or server_apl(info)
        fs = self.cache.features(info)
        rt = self.cache.runtime(key)
        accepted = duplicates = index = 0
        rejections: list[Rejection] = []
        gone = errors.NotFound(
            f"pool {pool_id!r} was deleted while this upload was running; later chunks were not stored",
            field="pool_id",
            reason="POOL_NOT_FOUND",
        )
        async for chunk in chunks:
            if len(chunk) > self.settings.max_items_per_chunk:
                raise errors.InvalidArgument(
                    f"chunk has {len(chunk)} items, more than max_items_per_chunk={self.settings.max_items_per_chunk}",
                    field="chunk.items",
                    reason="MAX_ITEMS_PER_CHUNK",
                )
            if not await self.store.call(self.store.pool_exists, key):
                raise gone
            good: list[tuple[int, ItemIn, dict[str, np.ndarray], str]] = []
            seen: set[str] = set()
            for item in chunk:
                try:
                    feats = self._check_item(item, index, dim, client_features, float16)
                except errors.InvalidArgument as e:
                    rejections.append(Rejection(item.item_id, index, e.field, e.reason, e.message))
                    index += 1
                    continue
                item_digest = digest(
                    item.prompt,
                    item.completion_a,
                    item.completion_b,
                    int(item.split),
                    item.heldout_preference,
                    *(f.tobytes() for f in feats.values()),
                )
                if item.item_id in seen:
                    rejections.append(
                        Rejection(
                            item.item_id,
                            index,
                            f"items[{index}].item_id",
                            "DUPLICATE_IN_STREAM",
                            "item_id appears twice in this chunk",
                        )
                    )
                else:
                    seen.add(item.item_id)
                    good.append((index, item, feats, item_digest))
                index += 1
            if not good:
                continue
            async with rt.lock:
                stored = await self.store.call(self.store.item_digests, key, [g[1].item_id for g in good])
                new: list[tuple[ItemIn, dict[str, np.ndarray], str]] = []
                for at, item, feats, item_digest in good:
                    old = stored.get(item.item_id)
                    if old is None:
                        new.append((item, feats, item_digest))
                    elif old == item_digest:
                        duplicates += 1
                    else:
                        rejections.append(
                            Rejection(
                                item.item_id,
                                at,
                                f"items[{at}].item_id",
                                "CONFLICT",
                                "an item with this item_id exists with different content",
                            )
                        )
                if not new:
                    continue
                try:
                    def prepare(
                        first: int, new: list[tuple[ItemIn, dict[str, np.ndarray], str]] = new
                    ) -> tuple[list[ItemRecord], str | None]:
                        # Inside the items' transaction: the feature rows (local file, then the
                        # artifact store's object) are durable before it commits.
                        rows_R = np.arange(first, first + len(new), dtype=np.int64)
                        chunk = None
                        if client_features:
                            block = {k: np.stack([f[k] for _, f, _ in new]) for k in ("prompt", "a", "b")}
                            fs.write_rows(rows_R, block)
                            chunk = self.cache.artifacts.put_features(key, rows_R, block, dtype=fs.dtype)
                        records = [item_record(item, int(r), d, client_features)
                                   for (item, _, d), r in zip(new, rows_R, strict=True)]
                        return records, chunk

                    await self.cache.io(
                        self.store.add_items, key, len(new), prepare,
                        featurizing=featurizing,
                    )
                except errors.NotFound:
                    raise gone from None
                accepted += len(new)
                if not featurizing:
                    rt.invalidate_items()  # the new rows are complete: they join at the next load
                elif rt.item_ids is not None:
                    rt.pending_rows += len(new)  # they join once featurised (Featurizer)
        if accepted and featurizing:
            self.featurizer.schedule(key)
        elif accepted:
            self.cache.schedule_graph(key)
        final = await self.store.call(self.store.pool_info, key, counts=True)
        if final is None:
            raise gone
        return UploadResult(accepted, duplicates, tuple(rejections)), final
