"""GetLearningCurve: what active learning saves on a pool, estimated in the background from its control labels.

The estimate rests on the control arm (`PoolSettings.control_fraction`): control labels
are a uniformly random sample of the pool, so a learner evaluated on control items it
did not train on has an unbiased held-out log-likelihood.

* Active curve: each posterior version (trained on the first `label_count` labels in
  storage order) is evaluated on the control labels stored after those.
* Random curve: a random-only learner (the pool's own posterior settings) trained on
  control labels alone, cross-fitted over `FOLDS` folds (trained on the others, evaluated
  on each fold), at half and at all of the training folds' labels.
* The saving at the random learner's largest label count, the slope of the active curve
  and a recommendation (`posterior.savings`), and the expected information gain of the
  next batch (the sum of its top BALD scores).

A call returns the latest estimate at once and, when labels or versions changed since,
starts computing a new one in the background (its fits run in worker threads; the
pool lock is held only to snapshot arrays), with progress in the reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from balpm_server import errors, metrics
from balpm_server.domain.models import PoolInfo, Split
from balpm_server.domain.pools import Pools
from balpm_server.domain.runtime import RuntimeCache
from balpm_server.posterior import EnsembleConfig, PosteriorStore, predict_probs, train_ensemble
from balpm_server.posterior.savings import (
    MIN_CONTROL_LABELS,
    MIN_EVAL_ITEMS,
    CurvePoint,
    Gain,
    Recommendation,
    Savings,
    Slope,
    estimate_gain,
    estimate_savings,
    estimate_slope,
    group_folds,
    point,
    recommend,
)
from balpm_server.settings import Settings
from balpm_server.storage import SqlStore

log = logging.getLogger(__name__)

FOLDS = 5
RANDOM_SIZES = (0.5, 1.0)  # shares of the training folds' control labels the random learner is fitted at
MAX_VERSIONS = 30  # the latest versions evaluated
DEFAULT_NEXT_BATCH = 100
MAX_NEXT_BATCH = 100_000


@dataclass(frozen=True)
class LearningCurve:
    """One computed estimate of a pool."""

    active: tuple[CurvePoint, ...] = ()
    random: tuple[CurvePoint, ...] = ()
    savings: Savings = field(default_factory=lambda: Savings(False, "not computed yet"))
    gain: Gain = field(default_factory=lambda: Gain(False, "not computed yet"))
    slope: Slope = field(default_factory=lambda: Slope(False, "not computed yet"))
    recommendation: Recommendation | None = None
    threshold_per_1k: float = 0.0
    label_count: int = 0
    control_label_count: int = 0
    posterior_version: int = 0
    compute_time_s: float = 0.0


@dataclass(frozen=True)
class CurveReport:
    """What GetLearningCurve answers: the latest estimate, the next batch's information gain, progress."""

    curve: LearningCurve
    expected_information_gain: float
    computing: bool
    fits_done: int
    fits_total: int
    error: str


class LearningCurves:
    """Background learning-curve estimates per pool.

    Args:
        settings: Server settings (device).
        store: The metadata store.
        pools: Pool lookups.
        cache: The pools' runtimes (features, posterior versions, BALD scores).
    """

    def __init__(self, settings: Settings, store: SqlStore, pools: Pools, cache: RuntimeCache) -> None:
        self.settings = settings
        self.store = store
        self.pools = pools
        self.cache = cache
        self._latest: dict[str, LearningCurve] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._progress: dict[str, tuple[int, int]] = {}
        self._errors: dict[str, str] = {}

    async def stop(self) -> None:
        """Cancel the running computations."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def forget(self, key: str) -> None:
        """Drop a pool's estimate (deleted, or owned elsewhere now)."""
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        self._latest.pop(key, None)

    async def get(self, tenant: str, pool_id: str, next_batch_size: int = 0) -> CurveReport:
        """The latest estimate; starts a new one in the background when labels or versions changed."""
        if next_batch_size < 0 or next_batch_size > MAX_NEXT_BATCH:
            raise errors.InvalidArgument(
                f"next_batch_size must be in [0, {MAX_NEXT_BATCH}]", field="next_batch_size"
            )
        info = await self.pools.require(tenant, pool_id, counts=True)
        await self.pools.ensure_ready(info)
        key = info.key
        latest = self._latest.get(key, LearningCurve())
        stale = latest.compute_time_s == 0.0 or (latest.label_count, latest.posterior_version) != (
            info.label_count, info.posterior_version
        )
        running = key in self._tasks and not self._tasks[key].done()
        if stale and not running:
            self._errors.pop(key, None)
            self._progress[key] = (0, 0)
            task = asyncio.get_running_loop().create_task(self._compute(info))
            self._tasks[key] = task
            running = True
        eig = await self._next_batch_gain(info, next_batch_size or DEFAULT_NEXT_BATCH)
        metrics.NEXT_BATCH_INFORMATION_GAIN.labels(info.tenant, info.pool_id).set(eig)
        done, total = self._progress.get(key, (0, 0))
        return CurveReport(latest, eig, running, done, total, self._errors.get(key, ""))

    async def _next_batch_gain(self, info: PoolInfo, batch_size: int) -> float:
        """Sum of the top `batch_size` BALD scores among acquirable pool rows (0 before the first posterior)."""
        if info.posterior_version == 0 or info.settings.posterior_kind != "mlp_ensemble":
            return 0.0
        rt = self.cache.runtime(info.key)
        async with rt.lock:
            await self.cache.load_items(info, rt)
            epistemic_N = self.cache.fresh_scores(info, rt)
            if epistemic_N is None:
                epistemic_N = await asyncio.to_thread(self.cache.scores, info, rt)
            assert rt.occupancy is not None and rt.split_N is not None
            candidate_N, _ = rt.occupancy.masks(rt.split_N == int(Split.POOL), "", time.time())
        if epistemic_N is None:
            return 0.0
        scores_R = epistemic_N[candidate_N]
        top_R = np.partition(scores_R, -batch_size)[-batch_size:] if scores_R.size > batch_size else scores_R
        return float(top_R.sum())

    # ---- the background computation ----------------------------------------------------

    async def _compute(self, info: PoolInfo) -> None:
        key = info.key
        try:
            curve = await self._estimate(info)
            self._latest[key] = curve
            _export_metrics(info, curve)
        except asyncio.CancelledError:
            raise
        except errors.BalpmError as e:
            self._errors[key] = e.message
        except Exception as e:  # reported in the reply; the server keeps running
            log.exception("learning curve of pool %s failed", info.pool_id)
            self._errors[key] = f"the estimate failed ({type(e).__name__}); see the server log"

    async def _estimate(self, info: PoolInfo) -> LearningCurve:
        s = info.settings
        if s.posterior_kind != "mlp_ensemble":
            raise errors.FailedPrecondition("learning curves are computed for MLP-ensemble pools only")
        rt = self.cache.runtime(info.key)
        async with rt.lock:  # a snapshot: the arrays are replaced, never written in place
            await self.cache.load_items(info, rt)
            a_N_D, b_N_D = rt.a_N_D, rt.b_N_D
        labels = await self.store.call(self.store.label_targets, info.key)
        assert a_N_D is not None and b_N_D is not None
        rows_L, targets_L, seq_L = labels.rows_L, labels.targets_L, labels.seq_L
        # Items that share a prompt (several comparisons of one prompt) are not independent: a
        # learner is never evaluated on a prompt it trained on, and folds keep a prompt together.
        group_L = (await self.store.call(self.store.prompt_groups, info.key))[rows_L]
        # Only the latest revision of an answer is evaluated or trained on (revised labels stay in
        # the list: a version that trained on an item's earlier answer is never evaluated on that
        # item); labels of items still featurising have no features yet.
        control_L = labels.control_L & labels.current_L & (rows_L < len(a_N_D))
        posteriors = self.cache.posterior_store(info.key)
        versions = list(range(max(1, info.posterior_version - MAX_VERSIONS + 1), info.posterior_version + 1))
        control_idx = np.flatnonzero(control_L)
        enough = control_idx.size >= MIN_CONTROL_LABELS and np.unique(group_L[control_idx]).size >= FOLDS
        n_random_fits = FOLDS * len(RANDOM_SIZES) if enough else 0
        total = len(versions) + n_random_fits
        self._progress[info.key] = (0, total)

        def tick() -> None:
            done, all_ = self._progress.get(info.key, (0, total))
            self._progress[info.key] = (done + 1, all_)

        active: list[CurvePoint] = []
        for version in versions:
            name = posteriors.folder_name(version)
            await asyncio.to_thread(
                self.cache.artifacts.restore_folder, f"pools/{info.key}/posterior/{name}/", posteriors.folder(version)
            )
            pt = await asyncio.to_thread(self._evaluate_version, posteriors, version, rows_L, targets_L, control_L,
                                         seq_L, group_L, a_N_D, b_N_D)
            if pt is not None:
                active.append(pt)
            tick()
        active.sort(key=lambda p: p.label_count)
        config = EnsembleConfig(
            ensemble_size=s.ensemble_size, hidden_sizes=tuple(s.hidden_sizes), epochs=s.epochs,
            batch_size=s.train_batch_size, learning_rate=s.learning_rate, weight_decay=s.weight_decay,
            val_fraction=s.val_fraction, patience=s.patience, bootstrap=s.bootstrap, device=self.settings.device,
        )
        random: list[CurvePoint] = []
        if n_random_fits:
            rng = np.random.default_rng([len(control_idx), 0x5A7E])
            fold_C = group_folds(group_L[control_idx], FOLDS, rng)  # a prompt's labels share a fold
            for share in RANDOM_SIZES:
                ll, correct, sizes = [], [], []
                for k in range(FOLDS):
                    train = control_idx[fold_C != k]
                    train = train[: max(MIN_EVAL_ITEMS, round(share * train.size))]
                    held = control_idx[fold_C == k]
                    r_tr, r_ev = rows_L[train], rows_L[held]
                    result = await asyncio.to_thread(
                        train_ensemble, a_N_D[r_tr], b_N_D[r_tr], targets_L[train], config, seed=k
                    )
                    p_I = predict_probs(result.state, a_N_D[r_ev], b_N_D[r_ev]).mean(axis=1)
                    fold_point = point(len(train), 0, p_I, targets_L[held])
                    ll.append(fold_point.ll_I)
                    correct.append(fold_point.correct_I)
                    sizes.append(len(train))
                    tick()
                random.append(CurvePoint(round(float(np.mean(sizes))), 0, np.concatenate(ll), np.concatenate(correct)))
        n_current = int(labels.current_L.sum())  # what GetPool counts (revised answers once)
        boot = np.random.default_rng([n_current, info.posterior_version, 0xB007])
        savings = estimate_savings(active, random[-1] if random else None, boot, control_labels=int(control_idx.size))
        gain = estimate_gain(active, random[-1] if random else None, boot)
        slope = estimate_slope(active, boot)
        return LearningCurve(
            tuple(active), tuple(random), savings, gain, slope, recommend(slope, s.stop_slope_per_1k),
            s.stop_slope_per_1k, n_current, int(control_idx.size), info.posterior_version, time.time(),
        )

    @staticmethod
    def _evaluate_version(
        posteriors: PosteriorStore, version: int, rows_L: np.ndarray, targets_L: np.ndarray, control_L: np.ndarray,
        seq_L: np.ndarray, group_L: np.ndarray, a_N_D: np.ndarray, b_N_D: np.ndarray,
    ) -> CurvePoint | None:
        """A version on the control labels of prompts it never trained on; None with too few of them.

        The version trained on (some of) the labels stored up to its `label_seq_through`; every
        item whose prompt had any of those labels (this item's, another annotator's, an earlier
        revision, another comparison of the same prompt) is left out.
        """
        try:
            state, manifest = posteriors.load(version)
        except errors.NotFound:
            return None
        trained = int(manifest.get("label_count", 0))
        if "label_seq_through" in manifest:
            seen_L = seq_L <= int(manifest["label_seq_through"])
        else:  # versions from before revisions and partial pools: the first `label_count` labels
            seen_L = np.arange(len(rows_L)) < trained
        after_L = ~np.isin(group_L, group_L[seen_L])
        held = np.flatnonzero(control_L & after_L)
        if held.size < MIN_EVAL_ITEMS:
            return None
        p_I = predict_probs(state, a_N_D[rows_L[held]], b_N_D[rows_L[held]]).mean(axis=1)
        return point(trained, version, p_I, targets_L[held])


def _export_metrics(info: PoolInfo, curve: LearningCurve) -> None:
    labels = (info.tenant, info.pool_id)
    metrics.SAVINGS_SHARE.labels(*labels).set(curve.savings.share if curve.savings.estimable else float("nan"))
    metrics.LEARNING_SLOPE_PER_1K.labels(*labels).set(curve.slope.per_1k if curve.slope.estimable else float("nan"))
    rec = curve.recommendation.value if curve.recommendation is not None else 0
    metrics.STOP_RECOMMENDATION.labels(*labels).set(rec)

