"""Acquisition: AcquireBatch (the fast BALD path and the general one), leases, ReleaseItems, item scores.

AcquireBatch picks under the pool lock from the in-memory occupancy, leases the picks
in memory (so the next caller skips them), then makes the leases durable with a group
commit before the reply; a failed or cancelled write takes them back. BALD over a
fresh score cache walks the cached ranking (O(rows looked at)); BAL-PM and
ENTROPY_ONLY run the greedy on the pool's `GreedyState`, which the occupancy keeps
current event by event (O(batch), not O(N)); the control arm draws by rejection
from the pool rows. Every other case (and the first call, which builds the state)
builds the full candidate masks and calls `acquisition.select_batch`.

Shapes: N pool items (feature rows), B batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Sequence

import numpy as np

from balpm_server import errors, metrics
from balpm_server.acquisition import (
    AcquisitionParams,
    AplInputs,
    CandidateBatch,
    GreedyState,
    KnnConvention,
    Strategy,
    first_open,
    sample_open,
    select_batch,
)
from balpm_server.acquisition.params import GRAPH_STRATEGIES, STOCHASTIC_BALD
from balpm_server.domain import validation as v
from balpm_server.domain.group_commit import GroupCommit
from balpm_server.domain.models import (
    AcquiredItem,
    AcquireResult,
    AplScores,
    ItemAplScores,
    ItemText,
    LeaseRequest,
    PoolInfo,
    Split,
)
from balpm_server.domain.pool_runtime import PoolRuntime
from balpm_server.domain.pools import Pools
from balpm_server.domain.runtime import RuntimeCache
from balpm_server.settings import Settings
from balpm_server.storage import SqlStore

MAX_RELEASE_IDS = 10_000
CONTROL_STREAM = 0xC0A7  # the control arm's generator: SeedSequence([seed, CONTROL_STREAM])
GREEDY_ON_LOOP_MAX_BATCH = 64  # a kept-state BAL-PM greedy up to this batch runs on the event loop
# Strategies that rank by the BALD scores of every pool row; the others score only their picks.
SCORED_STRATEGIES = frozenset({Strategy.BALD, Strategy.BALPM, *STOCHASTIC_BALD})
APL_STRATEGIES = frozenset({Strategy.APL_CERTAINTY, Strategy.APL_ENTROPY, Strategy.APL_HYBRID})


def _check_item_ids(item_ids: Sequence[str]) -> None:
    """The `item_ids` of ReleaseItems / ExcludeItems: 1..MAX_RELEASE_IDS well-formed ids."""
    if not item_ids:
        raise errors.InvalidArgument("item_ids is empty", field="item_ids")
    if len(item_ids) > MAX_RELEASE_IDS:
        raise errors.InvalidArgument(
            f"item_ids has {len(item_ids)} ids; at most {MAX_RELEASE_IDS} per call",
            field="item_ids",
            reason="TOO_MANY_IDS",
        )
    for i, iid in enumerate(item_ids):
        v.item_id(iid, f"item_ids[{i}]")


class Acquisition:
    """AcquireBatch, ReleaseItems and UpdateItemScores.

    Args:
        settings: Server settings (batch and lease limits).
        store: The metadata store.
        pools: Pool lookups.
        cache: The pools' runtimes, BALD scores and kNN graphs.
    """

    def __init__(self, settings: Settings, store: SqlStore, pools: Pools, cache: RuntimeCache) -> None:
        self.settings = settings
        self.store = store
        self.pools = pools
        self.cache = cache
        # Leases of concurrent AcquireBatch calls are written (and their texts read) together.
        self.leases: GroupCommit[LeaseRequest, dict[str, ItemText]] = GroupCommit(
            store.lease_and_read, flush_now=store.lease_and_read_nowait
        )

    def _params(self, info: PoolInfo, options: dict[str, float]) -> AcquisitionParams:
        """The pool's strategy settings with this call's overrides (checked)."""
        s = info.settings
        params = AcquisitionParams(
            k=s.knn_k,
            beta=options.get("beta", s.beta),
            d_ent=options.get("d_ent", s.d_ent),
            temperature=options.get("temperature", s.temperature),
            apl_beta_dpo=options.get("apl_beta_dpo", s.apl_beta_dpo),
            apl_entropy_top_s=int(options.get("apl_entropy_top_s", 0)),
            knn_convention=s.knn_convention,
        )
        v.finite(params.beta, "options.beta", low=0.0)
        v.finite(params.d_ent, "options.d_ent", low=0.0, low_open=True)
        v.finite(params.temperature, "options.temperature", low=0.0, low_open=True)
        v.finite(params.apl_beta_dpo, "options.apl_beta_dpo", low=0.0, low_open=True)
        return params

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
        info = await self.pools.require(tenant, pool_id)
        await self.pools.ensure_ready(info)
        if batch_size < 1:
            raise errors.InvalidArgument("batch_size must be at least 1", field="batch_size")
        if batch_size > self.settings.max_batch_size:
            raise errors.InvalidArgument(
                f"batch_size {batch_size} exceeds max_batch_size={self.settings.max_batch_size}",
                field="batch_size",
                reason="MAX_BATCH_SIZE",
            )
        v.finite(lease_ttl_s, "lease_ttl_s", low=0.0)
        if lease_ttl_s > self.settings.max_lease_ttl_s:
            raise errors.InvalidArgument(
                f"lease_ttl_s {lease_ttl_s} exceeds max_lease_ttl_s={self.settings.max_lease_ttl_s:.0f}",
                field="lease_ttl_s",
                reason="MAX_LEASE_TTL",
            )
        ttl_s = lease_ttl_s or self.settings.default_lease_ttl_s
        annotator = v.annotator_id(annotator_id, "annotator_id")
        strat = strategy or info.settings.default_strategy
        params = self._params(info, options)
        rt = self.cache.runtime(info.key)
        async with rt.lock:
            started = time.perf_counter()
            await self.cache.load_items(info, rt)
            if self.settings.cluster:  # labels ingested through other replicas
                await self.cache.sync_labels(info, rt)
                await self.cache.load_items(info, rt)
            assert rt.item_ids is not None and rt.occupancy is not None
            now = time.time()
            expire_s = now + ttl_s
            rt.occupancy.purge_expired(now)
            # The control arm first, leased in memory at once: the strategy never picks those
            # rows and counts them as acquired (BAL-PM's entropy term).
            control_R = self._control_rows(info, rt, batch_size, annotator, now, seed)
            for r in control_R.tolist():
                rt.occupancy.add_lease(r, annotator, expire_s)
            try:
                epistemic_N = self.cache.fresh_scores(info, rt)
                if epistemic_N is None and strat in SCORED_STRATEGIES:
                    epistemic_N = await asyncio.to_thread(self.cache.scores, info, rt)
                batch = await self._by_strategy(
                    info, rt, strat, batch_size - control_R.size, annotator, now, seed, params, epistemic_N
                )
            except BaseException:
                for r in control_R.tolist():
                    rt.occupancy.release(r, annotator)
                raise
            strategy_rows = batch.indices_B.tolist()
            if control_R.size:
                epi_C = await self._bald_of(info, rt, control_R, epistemic_N)
                batch = CandidateBatch(
                    np.concatenate([batch.indices_B, control_R]), np.concatenate([batch.total_B, epi_C]),
                    np.concatenate([batch.epistemic_B, epi_C]),
                    np.concatenate([batch.entropy_B, np.full(control_R.size, np.nan)]),
                )
            rows_B = batch.indices_B.tolist()
            chosen = [rt.item_ids[r] for r in rows_B]
            control_ids = frozenset(rt.item_ids[r] for r in control_R.tolist())
            # Leased in memory under the lock (so the next caller skips these rows), then
            # made durable before the reply; a failed write takes the leases back.
            for r in strategy_rows:
                rt.occupancy.add_lease(r, annotator, expire_s)
        write = asyncio.ensure_future(
            self.leases.submit(LeaseRequest(info.key, tuple(chosen), annotator, expire_s, control_ids))
        )
        try:
            texts = await asyncio.shield(write)
        except BaseException:
            # Failed, or cancelled (client deadline) while the write goes ahead regardless:
            # take the leases back, in SQLite too once that write has landed.
            await asyncio.shield(self._take_back_leases(rt, write, info.key, chosen, rows_B, annotator))
            raise
        acquire_s = time.perf_counter() - started
        metrics.observe_acquisition(strat.name, acquire_s, batch.epistemic_B, batch.entropy_B)
        items = tuple(
            AcquiredItem(
                item=texts[iid],
                total=float(batch.total_B[i]),
                epistemic=float(batch.epistemic_B[i]),
                entropy=float(batch.entropy_B[i]),
                rank=i,
                control=iid in control_ids,
            )
            for i, iid in enumerate(chosen)
        )
        return AcquireResult(items, info.posterior_version, strat, expire_s, acquire_s)

    async def _take_back_leases(
        self,
        rt: PoolRuntime,
        write: asyncio.Future[dict[str, ItemText]],
        key: str,
        item_ids: Sequence[str],
        rows_B: Sequence[int],
        annotator: str,
    ) -> None:
        """End the leases of an acquisition whose reply will not be sent.

        Waits for its lease write first (it goes ahead even when the caller is cancelled),
        so the SQLite rows are deleted after they exist; the in-memory leases stay until
        then, so nobody is handed those rows meanwhile.
        """
        with contextlib.suppress(BaseException):
            await write
        written = write.done() and not write.cancelled() and write.exception() is None  # else nothing stored
        async with rt.lock:
            if written:
                await self.store.call(self.store.release_leases, key, item_ids, annotator)
            if rt.occupancy is not None:
                for r in rows_B:
                    rt.occupancy.release(r, annotator)

    async def _by_strategy(
        self,
        info: PoolInfo,
        rt: PoolRuntime,
        strat: Strategy,
        batch_size: int,
        annotator: str,
        now: float,
        seed: int,
        params: AcquisitionParams,
        epistemic_N: np.ndarray | None,
    ) -> CandidateBatch:
        """The strategy's `batch_size` picks (none for a batch the control arm filled), with their BALD reported."""
        if batch_size == 0:
            empty = np.zeros(0)
            return CandidateBatch(np.zeros(0, dtype=np.int64), empty, empty, empty)
        batch = None
        if strat is Strategy.BALD and epistemic_N is not None and rt.bald_order_R is not None:
            batch = self._bald_fast(rt, epistemic_N, batch_size, annotator)
        elif strat in GRAPH_STRATEGIES:
            batch = await self._greedy_fast(rt, strat, params, epistemic_N, batch_size, annotator)
        if batch is None:
            batch = await self._select(info, rt, strat, batch_size, annotator, now, seed, params, epistemic_N)
        if info.posterior_version and strat not in SCORED_STRATEGIES:  # report the picks' BALD
            batch = dataclasses.replace(batch, epistemic_B=await self._bald_of(info, rt, batch.indices_B, epistemic_N))
        return batch

    async def _bald_of(
        self, info: PoolInfo, rt: PoolRuntime, rows_R: np.ndarray, epistemic_N: np.ndarray | None
    ) -> np.ndarray:
        """BALD of some rows under the latest posterior: the cached scores when there are, else these rows'
        alone (zeros before the first posterior)."""
        if epistemic_N is not None:
            return np.asarray(epistemic_N[rows_R], dtype=np.float64)
        epi_R = await asyncio.to_thread(self.cache.epistemic_of_rows, info, rt, rows_R)
        return np.asarray(epi_R, dtype=np.float64)

    @staticmethod
    def _control_rows(
        info: PoolInfo, rt: PoolRuntime, batch_size: int, annotator: str, now: float, seed: int
    ) -> np.ndarray:
        """Rows the control arm draws for this batch: uniformly among the caller's acquirable pool rows.

        floor(f * B) of them, plus one with probability frac(f * B), from a generator seeded by
        the call's seed (apart from the strategy's own draws): the same call draws the same rows.
        Drawn by rejection from the pool rows (`sample_open`, O(draws)); from the full
        candidate mask when few rows are left open.
        """
        f = info.settings.control_fraction
        if f <= 0.0:
            return np.zeros(0, dtype=np.int64)
        assert rt.split_N is not None and rt.occupancy is not None
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, CONTROL_STREAM])
        expected = f * batch_size
        want = int(np.floor(expected)) + int(rng.random() < expected - np.floor(expected))
        if want == 0:
            return np.zeros(0, dtype=np.int64)
        occ = rt.occupancy
        drawn = sample_open(rng, rt.pool_rows(), want, lambda rows_R: occ.open_among(rows_R, annotator))
        if drawn is not None:
            return drawn
        candidate_N, _acquired_N = rt.occupancy.masks(rt.split_N == int(Split.POOL), annotator, now)
        candidates_R = np.flatnonzero(candidate_N)
        if candidates_R.size == 0:
            return np.zeros(0, dtype=np.int64)  # the strategy raises the precise error
        return rng.choice(candidates_R, size=min(want, candidates_R.size), replace=False).astype(np.int64)

    @staticmethod
    def _bald_fast(rt: PoolRuntime, epistemic_N: np.ndarray, batch_size: int, annotator: str) -> CandidateBatch | None:
        """BALD top-B by walking the cached ranking; None when it cannot fill the batch.

        Same rows as `select_batch(BALD)` over the full candidate mask (tested), in
        O(rows looked at) instead of O(N).
        """
        assert rt.occupancy is not None and rt.bald_order_R is not None
        occ = rt.occupancy
        rows_B = first_open(rt.bald_order_R, batch_size, lambda rows_R: occ.open_among(rows_R, annotator))
        if rows_B.size < batch_size:
            return None  # the general path raises the precise error
        epi_B = epistemic_N[rows_B]
        return CandidateBatch(rows_B, epi_B, epi_B, np.full(batch_size, np.nan))

    @staticmethod
    async def _greedy_fast(
        rt: PoolRuntime,
        strat: Strategy,
        params: AcquisitionParams,
        epistemic_N: np.ndarray | None,
        batch_size: int,
        annotator: str,
    ) -> CandidateBatch | None:
        """BAL-PM / ENTROPY_ONLY from the pool's kept `GreedyState`; None without one or when it cannot fill the batch.

        The same batch as `select_batch` over the full masks (tested): the occupancy has
        kept n(x) and the keys current, so the call costs the greedy's own steps.
        """
        state = rt.current_greedy()
        standard = KnnConvention(params.knn_convention) is KnnConvention.STANDARD
        if state is None or state.graph.k != params.k or not standard:
            return None
        assert rt.occupancy is not None
        state.configure(epistemic_N if strat is Strategy.BALPM else None, params.beta, params.d_ent)
        closed_R = rt.occupancy.own_rows(annotator) if rt.occupancy.k > 1 else None
        if batch_size <= GREEDY_ON_LOOP_MAX_BATCH:  # ~50 us a pick: cheaper than a thread hop
            return state.pick(batch_size, closed_R)
        return await asyncio.to_thread(state.pick, batch_size, closed_R)  # the pool lock is held

    async def _select(
        self,
        info: PoolInfo,
        rt: PoolRuntime,
        strat: Strategy,
        batch_size: int,
        annotator: str,
        now: float,
        seed: int,
        params: AcquisitionParams,
        epistemic_N: np.ndarray | None,
    ) -> CandidateBatch:
        """The general path: full candidate masks, then `select_batch` (off the loop unless cheap)."""
        assert rt.split_N is not None and rt.prompt_N_D is not None and rt.occupancy is not None
        s = info.settings
        pool_N = rt.split_N == int(Split.POOL)
        candidate_N, acquired_N = rt.occupancy.masks(pool_N, annotator, now)
        n_candidates = int(candidate_N.sum())
        if n_candidates == 0:
            raise errors.FailedPrecondition(
                f"pool {info.pool_id!r} has no acquirable items left (all labelled or leased)",
                field="batch_size",
                reason="POOL_EXHAUSTED",
            )
        if batch_size > n_candidates:
            raise errors.FailedPrecondition(
                f"batch_size {batch_size} exceeds the {n_candidates} acquirable items of pool {info.pool_id!r}",
                field="batch_size",
                reason="BATCH_LARGER_THAN_POOL",
                metadata={"acquirable": str(n_candidates)},
            )
        uses_knn = strat in (Strategy.BALPM, Strategy.ENTROPY_ONLY)
        authors = s.knn_convention is KnnConvention.AUTHORS  # radii over this call's candidates, no graph
        needs_graph = uses_knn and not authors
        if uses_knn:
            # STANDARD needs k other pool rows per row; AUTHORS k candidates (the point itself included).
            population, need = (n_candidates, s.knn_k) if authors else (int(pool_N.sum()), s.knn_k + 1)
            if population < need:
                raise errors.FailedPrecondition(
                    f"BAL-PM with knn_k={s.knn_k} needs at least {need} "
                    f"{'acquirable' if authors else 'pool'} items; the pool has {population}",
                    field="strategy",
                    reason="POOL_TOO_SMALL",
                )
        if needs_graph and rt.graph is None:
            rt.graph = await asyncio.to_thread(self.cache.graph, info, rt.prompt_N_D, pool_N)
        count_N = None
        if needs_graph:
            assert rt.graph is not None
            if rt.current_greedy() is None:
                # Built once per graph and occupancy; from then on every lease, label, release and expiry
                # updates it through the occupancy, so later calls take `_greedy_fast`.
                rt.greedy = GreedyState.standard(rt.graph, acquired_N=acquired_N, open_N=rt.occupancy.open_rows(pool_N))
                rt.occupancy.on_change = rt.greedy.observe
            assert rt.greedy is not None
            count_N = rt.greedy.counts()  # a snapshot: the greedy runs off the loop
        apl = None
        if strat in APL_STRATEGIES:
            m = (await self.store.call(self.store.apl_scores, info.key))[: len(rt.split_N)]  # joined rows
            apl = AplInputs(m[:, 0], m[:, 1], m[:, 2], m[:, 3], m[:, 4] if np.isfinite(m[:, 4]).any() else None)
        select = functools.partial(
            select_batch,
            strat,
            batch_size=batch_size,
            candidate_mask_N=candidate_N,
            acquired_mask_N=acquired_N,
            rng=np.random.default_rng(seed),
            params=params,
            epistemic_N=epistemic_N,
            graph=rt.graph if needs_graph else None,
            apl=apl,
            prompt_N_D=rt.prompt_N_D if uses_knn and authors else None,
            standardize_prompt=s.standardize_features,
            count_N=count_N,
        )
        if strat in (Strategy.RANDOM, Strategy.BALD):  # O(N) array work: cheaper than a thread hop
            return select()
        return await asyncio.to_thread(select)

    async def release(self, tenant: str, pool_id: str, item_ids: Sequence[str], annotator_id: str) -> int:
        """End leases on items; returns how many leases ended."""
        key = (await self.pools.require(tenant, pool_id)).key
        _check_item_ids(item_ids)
        ann = v.annotator_id(annotator_id, "annotator_id") if annotator_id else ""
        rt = self.cache.runtime(key)
        async with rt.lock:
            released = await self.store.call(self.store.release_leases, key, item_ids, ann)
            if rt.occupancy is not None:
                for iid in item_ids:
                    if iid in rt.row_of:
                        rt.occupancy.release(rt.row_of[iid], ann)
            return released

    async def exclude(self, tenant: str, pool_id: str, item_ids: Sequence[str], *, include: bool) -> tuple[int, int]:
        """Exclude pool items from acquisition (ending their leases) or include them again.

        Returns:
            (items changed, items excluded now).
        """
        info = await self.pools.require(tenant, pool_id)
        _check_item_ids(item_ids)
        rt = self.cache.runtime(info.key)
        async with rt.lock:
            split_of = await self.store.call(self.store.item_splits, info.key, item_ids)
            for i, iid in enumerate(item_ids):
                if iid not in split_of:
                    raise errors.NotFound(
                        f"item_ids[{i}] {iid!r} is not an item of pool {pool_id!r}",
                        field=f"item_ids[{i}]",
                        reason="ITEM_NOT_FOUND",
                    )
                if split_of[iid] == int(Split.HELDOUT):
                    raise errors.InvalidArgument(
                        f"item_ids[{i}] {iid!r} is a held-out item; only pool items are acquired",
                        field=f"item_ids[{i}]",
                        reason="HELDOUT_ITEM",
                    )
            changed = await self.store.call(self.store.set_excluded, info.key, item_ids, not include)
            if rt.occupancy is not None:
                for iid in item_ids:
                    row = rt.row_of.get(iid)
                    if row is not None:
                        rt.occupancy.set_excluded(row, not include)
        return changed, await self.store.call(self.store.excluded_count, info.key)

    async def update_item_scores(self, tenant: str, pool_id: str, scores: Sequence[tuple[str, AplScores]]) -> int:
        """Set APL log-probabilities of items."""
        key = (await self.pools.require(tenant, pool_id)).key
        if not scores:
            raise errors.InvalidArgument("scores is empty", field="scores")
        for i, (iid, s) in enumerate(scores):
            v.item_id(iid, f"scores[{i}].item_id")
            v.apl_scores(s, f"scores[{i}].apl_scores")
        known = await self.store.call(self.store.item_texts, key, [iid for iid, _ in scores])
        for i, (iid, _) in enumerate(scores):
            if iid not in known:
                raise errors.NotFound(f"scores[{i}].item_id {iid!r} is not in the pool", field=f"scores[{i}].item_id")
        return await self.store.call(self.store.update_apl_scores, key, [ItemAplScores(iid, s) for iid, s in scores])
