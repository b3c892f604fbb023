"""Inference: Predict and Evaluate under the pool's latest posterior.

Items are given by id (their stored features) or ad hoc (client features, or texts
the server featurises: at most `max_predict_texts` per call and
`max_extractions_per_tenant` such calls at once per tenant). The uncertainty
decomposition and the metrics come from `balpm_server.bernoulli` (through
`posterior.evaluate`), the same formulas AcquireBatch's BALD scores use.

Shapes: N items, D feature dim, E ensemble members.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence

import numpy as np

from balpm_server import bernoulli, errors
from balpm_server.domain import validation as v
from balpm_server.domain.models import (
    EvaluationOut,
    FeatureSource,
    ItemIn,
    PoolInfo,
    PredictionOut,
    Preference,
    Split,
)
from balpm_server.domain.pool_runtime import PoolRuntime
from balpm_server.domain.pools import Pools
from balpm_server.domain.runtime import RuntimeCache
from balpm_server.features import FeatureExtractor
from balpm_server.posterior import evaluate
from balpm_server.settings import Settings

# (item ids, features of A [N, D], features of B [N, D], pair texts A, pair texts B (LoRA pools))
Inputs = tuple[list[str], np.ndarray, np.ndarray, list[str], list[str]]


class Inference:
    """Predict and Evaluate.

    Args:
        settings: Server settings (ad-hoc text limits).
        pools: Pool lookups.
        cache: The pools' runtimes and posteriors.
        extractor: Feature extractor for ad-hoc texts (None: texts are refused).
    """

    def __init__(
        self, settings: Settings, pools: Pools, cache: RuntimeCache, extractor: FeatureExtractor | None
    ) -> None:
        self.settings = settings
        self.pools = pools
        self.cache = cache
        self.extractor = extractor
        self._extracting: dict[str, int] = {}  # tenant -> ad-hoc extractions running

    @contextlib.contextmanager
    def _extraction_slot(self, tenant: str) -> Iterator[None]:
        """Count one ad-hoc extraction against the tenant's `max_extractions_per_tenant`."""
        held = self._extracting.get(tenant, 0)
        limit = self.settings.max_extractions_per_tenant
        if held >= limit:
            raise errors.ResourceExhausted(
                f"tenant already runs max_extractions_per_tenant={limit} Predict/Evaluate calls with ad-hoc "
                "texts; retry when one finishes, or pass item_ids of stored items",
                field="items",
                reason="EXTRACTION_BUSY",
            )
        self._extracting[tenant] = held + 1
        try:
            yield
        finally:
            self._extracting[tenant] -= 1
            if not self._extracting[tenant]:
                del self._extracting[tenant]

    async def _inputs(
        self,
        tenant: str,
        info: PoolInfo,
        rt: PoolRuntime,
        item_ids: Sequence[str],
        items: Sequence[ItemIn],
        field: str,
    ) -> Inputs:
        """Features (and, for LoRA pools, pair texts) of stored items (by id) or ad-hoc items."""
        async with rt.lock:  # a snapshot: a join of newly featurised rows replaces the arrays meanwhile
            await self.cache.load_items(info, rt)
            row_of, a_N_D, b_N_D, pending = rt.row_of, rt.a_N_D, rt.b_N_D, rt.pending_rows
            all_a, all_b = await self.cache.store.call(self.cache.texts, info, rt)
        assert a_N_D is not None and b_N_D is not None
        lora = info.settings.posterior_kind == "lora_ensemble"
        pair_a: list[str] = []
        pair_b: list[str] = []

        async def unknown(iid: str, at: str) -> errors.BalpmError:
            waiting = bool(pending) and bool(await self.cache.store.call(self.cache.store.item_splits, info.key, [iid]))
            if waiting:
                return errors.FailedPrecondition(
                    f"{at} {iid!r} is still waiting for its features; retry when GetPool's featurized_count "
                    "covers it",
                    field=at,
                    reason="ITEM_FEATURIZING",
                )
            return errors.NotFound(f"{at} {iid!r} is not in pool {info.pool_id!r}", field=at)

        if item_ids:
            rows = []
            for i, iid in enumerate(item_ids):
                row = row_of.get(iid)
                if row is None:
                    raise await unknown(iid, f"{field}[{i}]")
                rows.append(row)
            if lora:
                pair_a, pair_b = [all_a[r] for r in rows], [all_b[r] for r in rows]
            # float32 for the heads whatever the pool stores (a float16 pool's rows upcast exactly)
            fa_R_D = a_N_D[rows].astype(np.float32, copy=False)
            fb_R_D = b_N_D[rows].astype(np.float32, copy=False)
            return list(item_ids), fa_R_D, fb_R_D, pair_a, pair_b
        dim = info.settings.feature_dim
        ids, fa, fb, texts_a, texts_b = [], [], [], [], []
        for i, item in enumerate(items):
            ids.append(item.item_id)
            if item.item_id and not (item.completion_a_features or item.prompt or item.completion_a):
                row = row_of.get(item.item_id)
                if row is None:
                    raise await unknown(item.item_id, f"{field}[{i}].item_id")
                fa.append(a_N_D[row])
                fb.append(b_N_D[row])
                if lora:
                    pair_a.append(all_a[row])
                    pair_b.append(all_b[row])
                continue
            if lora:
                pair_a.append(item.prompt + item.completion_a)
                pair_b.append(item.prompt + item.completion_b)
            if info.settings.feature_source == FeatureSource.CLIENT:
                fa.append(v.features(item.completion_a_features, dim, f"{field}[{i}].completion_a_features"))
                fb.append(v.features(item.completion_b_features, dim, f"{field}[{i}].completion_b_features"))
            else:
                v.text(item.prompt, f"{field}[{i}].prompt")
                texts_a.append(item.prompt + item.completion_a)
                texts_b.append(item.prompt + item.completion_b)
        if texts_a:
            if len(texts_a) > self.settings.max_predict_texts:
                raise errors.InvalidArgument(
                    f"{field} has {len(texts_a)} ad-hoc items to featurise; at most "
                    f"max_predict_texts={self.settings.max_predict_texts} per call (upload them and pass item_ids)",
                    field=field,
                    reason="TOO_MANY_TEXTS",
                )
            if self.extractor is None:
                raise errors.FailedPrecondition(
                    "this server has no feature extractor for ad-hoc texts", field=field, reason="NO_EXTRACTOR"
                )
            with self._extraction_slot(tenant):
                feats = await self.extractor.embed(texts_a + texts_b)
            return ids, feats[: len(texts_a)], feats[len(texts_a) :], pair_a, pair_b
        return ids, np.stack(fa).astype(np.float32), np.stack(fb).astype(np.float32), pair_a, pair_b

    async def predict(
        self, tenant: str, pool_id: str, item_ids: Sequence[str], items: Sequence[ItemIn]
    ) -> tuple[list[PredictionOut], int]:
        """Predict P(A preferred) with epistemic and aleatoric uncertainty (`bernoulli.decompose`)."""
        info = await self.pools.require(tenant, pool_id)
        await self.pools.ensure_ready(info)
        if not item_ids and not items:
            raise errors.InvalidArgument("give item_ids or items", field="item_ids", reason="EMPTY_BATCH")
        if item_ids and items:
            raise errors.InvalidArgument(
                "give item_ids or items, not both", field="items", reason="ITEM_IDS_AND_ITEMS"
            )
        rt = self.cache.runtime(info.key)
        self.cache.require_posterior(info, rt)
        ids, fa, fb, ta, tb = await self._inputs(tenant, info, rt, item_ids, items, "item_ids" if item_ids else "items")
        probs_N_E = await asyncio.to_thread(self.cache.member_probs, rt, fa, fb, ta, tb)
        d = bernoulli.decompose(probs_N_E)
        out = [
            PredictionOut(
                iid,
                float(d.mean_N[i]),
                float(d.epistemic_N[i]),
                float(d.aleatoric_N[i]),
                tuple(float(p) for p in probs_N_E[i]),
            )
            for i, iid in enumerate(ids)
        ]
        return out, info.posterior_version

    async def evaluate(self, tenant: str, pool_id: str, items: Sequence[tuple[ItemIn, Preference]]) -> EvaluationOut:
        """Evaluate on given labelled items, or on the held-out split when none are given."""
        info = await self.pools.require(tenant, pool_id)
        await self.pools.ensure_ready(info)
        rt = self.cache.runtime(info.key)
        self.cache.require_posterior(info, rt)
        if items:
            _ids, fa, fb, ta, tb = await self._inputs(tenant, info, rt, [], [it for it, _ in items], "items")
            targets_N = np.array([p.target for _, p in items], dtype=np.float64)
        else:
            async with rt.lock:  # held-out items still featurising are evaluated once they have features
                await self.cache.load_items(info, rt)
                assert rt.split_N is not None and rt.a_N_D is not None and rt.b_N_D is not None
                rows = np.flatnonzero(rt.split_N == int(Split.HELDOUT))
                if len(rows) == 0:
                    raise errors.FailedPrecondition(
                        f"pool {pool_id!r} has no held-out items with features; pass items or upload "
                        "SPLIT_HELDOUT items",
                        field="items",
                        reason="NO_HELDOUT",
                    )
                assert rt.heldout_target_N is not None
                fa = rt.a_N_D[rows].astype(np.float32, copy=False)  # a float16 pool's rows, upcast exactly
                fb = rt.b_N_D[rows].astype(np.float32, copy=False)
                targets_N = rt.heldout_target_N[rows]
                all_a, all_b = await self.cache.store.call(self.cache.texts, info, rt)
            ta, tb = ([all_a[r] for r in rows], [all_b[r] for r in rows]) if all_a else ([], [])
        probs_N_E = await asyncio.to_thread(self.cache.member_probs, rt, fa, fb, ta, tb)
        m = evaluate(probs_N_E, targets_N)
        return EvaluationOut(
            m.log_likelihood, m.accuracy, m.brier, m.ece, m.mean_epistemic, m.count, info.posterior_version
        )
