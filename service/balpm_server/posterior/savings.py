"""What active learning saves, from a pool's own labels: learning curves, the saving at equal LL, a stopping signal.

Pure functions over arrays (no I/O). Every curve point is a learner evaluated on
control-labelled items (drawn uniformly at random by the control arm) that it did not
train on, so its mean log-likelihood is an unbiased estimate of the learner's held-out
log-likelihood on the pool; the per-item values are kept so that intervals come from a
bootstrap over evaluation items.

* `labels_to_reach`: where a piecewise-linear curve first reaches a log-likelihood,
  within the label counts it covers (no extrapolation).
* `estimate_savings`: the share of labels the active learner saves against the
  random-only learner at the random learner's largest label count: 1 - n_active / n_random
  at equal log-likelihood, with a bootstrap 95% interval.
* `estimate_gain`: the active learner's held-out LL minus the random-only learner's at the
  latter's label count (interpolated, never extrapolated), with a bootstrap 95% interval.
* `estimate_slope` / `recommend`: the slope of the active learner's held-out LL per 1,000
  labels over its latest versions, and CONTINUE / DIMINISHING / STOP against a threshold.

Shapes: I evaluation items of one point, P curve points, B bootstrap replicates.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_EVAL_ITEMS = 10  # a curve point needs this many control items it did not train on
MIN_CONTROL_LABELS = 50  # the random-only learner needs this many control labels (5 folds of 10)
MIN_SLOPE_POINTS = 3
SLOPE_POINTS = 5  # the slope is fitted over the latest versions only
BOOTSTRAP = 200


@dataclass(frozen=True)
class CurvePoint:
    """One learner at one label count, evaluated on control items it did not train on.

    Attributes:
        label_count: Labels it trained on.
        version: The posterior version (active learner), 0 for the random-only learner.
        ll_I: Log-likelihood (nats) of each evaluation item.
        correct_I: Whether the prediction's side matched the label (ties excluded), per item; NaN for ties.
    """

    label_count: int
    version: int
    ll_I: np.ndarray
    correct_I: np.ndarray

    @property
    def log_likelihood(self) -> float:
        """Mean held-out log-likelihood per label."""
        return float(self.ll_I.mean())

    @property
    def stderr(self) -> float:
        """Standard error of `log_likelihood`."""
        return float(self.ll_I.std(ddof=1) / np.sqrt(len(self.ll_I))) if len(self.ll_I) > 1 else float("nan")

    @property
    def accuracy(self) -> float:
        """Share of non-tie evaluation labels predicted on the right side."""
        decided = self.correct_I[np.isfinite(self.correct_I)]
        return float(decided.mean()) if decided.size else float("nan")


def point(label_count: int, version: int, p_I: np.ndarray, targets_I: np.ndarray) -> CurvePoint:
    """A curve point from predicted P(A preferred) and the labels' targets (1, 0 or 0.5)."""
    from balpm_server.bernoulli import log_likelihood

    correct_I = np.where(targets_I == 0.5, np.nan, ((p_I > 0.5) == (targets_I > 0.5)).astype(np.float64))
    return CurvePoint(label_count, version, log_likelihood(p_I, targets_I), correct_I)


def group_folds(group_C: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Cross-fitting folds that keep each group (one prompt's comparisons) together.

    Args:
        group_C: Group id of each control label.
        folds: Number of folds.
        rng: Generator of the assignment.

    Returns:
        int64 fold (0..folds-1) of each label; the groups are dealt round-robin in random order.
    """
    groups_G, index_C = np.unique(np.asarray(group_C), return_inverse=True)
    return np.asarray((rng.permutation(groups_G.size) % folds)[index_C], dtype=np.int64)


def _resampled_mean(p: CurvePoint, rng: np.random.Generator) -> float:
    """One bootstrap replicate of a point's log-likelihood: the mean of its evaluation items drawn with replacement."""
    return float(rng.choice(p.ll_I, size=len(p.ll_I)).mean())


def labels_to_reach(counts_P: Sequence[float], ll_P: Sequence[float], target: float) -> tuple[float | None, str]:
    """The label count at which the curve through (counts, ll) first reaches `target` (linear in between).

    Returns:
        (count, "") or (None, why): never reached within the observed counts, or already
        above the target at the first point (how many fewer labels would do is unobserved).
    """
    if not len(counts_P):
        return None, "no posterior version has been evaluated yet"
    if ll_P[0] >= target:
        return None, (
            f"the first evaluated posterior version (at {int(counts_P[0])} labels) already reaches the random "
            "learner's log-likelihood; versions trained at fewer labels are needed to say by how much"
        )
    for i in range(1, len(counts_P)):
        if ll_P[i] >= target:
            frac = (target - ll_P[i - 1]) / (ll_P[i] - ll_P[i - 1])
            return counts_P[i - 1] + frac * (counts_P[i] - counts_P[i - 1]), ""
    return None, (
        f"the active learner has not reached the random learner's log-likelihood within the {int(counts_P[-1])} "
        "labels observed"
    )


@dataclass(frozen=True)
class Savings:
    """The estimated share of labels saved at equal held-out log-likelihood.

    Attributes:
        estimable: Whether there is an estimate.
        reason: Why not (when not estimable).
        control_labels_needed: More control labels needed first (0 when that is not the reason).
        share: 1 - active labels / random labels at equal log-likelihood.
        low: Lower end of the bootstrap 95% interval.
        high: Upper end.
        random_labels: The random-only learner's label count at the comparison.
        active_labels: Labels the active learner needed for the same log-likelihood (interpolated).
        log_likelihood: The log-likelihood compared at.
    """

    estimable: bool
    reason: str = ""
    control_labels_needed: int = 0
    share: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")
    random_labels: int = 0
    active_labels: float = float("nan")
    log_likelihood: float = float("nan")


def monotone_fit(ll_P: Sequence[float], weight_P: Sequence[float]) -> np.ndarray:
    """The non-decreasing curve closest to `ll_P` in weighted least squares (isotonic regression).

    Pool adjacent violators: a point below its predecessor is merged with it into their
    weighted mean, repeatedly. A learning curve rises with labels in expectation; its
    evaluation noise does not, and the first crossing of a noisy curve is decided by its
    noisiest dip or spike, while the fit's crossing pools the neighbouring versions.

    Args:
        ll_P: Held-out log-likelihood per point, by increasing label count.
        weight_P: Weight per point (its evaluation item count).

    Returns:
        fit_P: float64, non-decreasing.
    """
    blocks: list[tuple[float, float, int]] = []  # (weighted mean, weight, points)
    for y, w in zip(ll_P, weight_P, strict=True):
        mean, weight, count = float(y), float(w), 1
        while blocks and blocks[-1][0] > mean:
            m0, w0, c0 = blocks.pop()
            mean, weight, count = (m0 * w0 + mean * weight) / (w0 + weight), w0 + weight, c0 + count
        blocks.append((mean, weight, count))
    return np.repeat([b[0] for b in blocks], [b[2] for b in blocks]).astype(np.float64)


def _share(active: Sequence[CurvePoint], means_P: Sequence[float], random_ll: float, random_n: int) -> float | None:
    """1 - (labels at which the active learner's monotone fit first reaches `random_ll`) / random_n."""
    fit_P = monotone_fit(means_P, [len(p.ll_I) for p in active])
    n_active, _why = labels_to_reach([p.label_count for p in active], list(fit_P), random_ll)
    return None if n_active is None else 1.0 - n_active / random_n


def estimate_savings(
    active: Sequence[CurvePoint], random: CurvePoint | None, rng: np.random.Generator, *,
    control_labels: int, n_boot: int = BOOTSTRAP,
) -> Savings:
    """The saving of the active learner against the random-only learner, with a bootstrap 95% interval.

    The active learner's label count at the random-only learner's log-likelihood is read
    off the monotone (isotonic) fit of its curve (`monotone_fit`), in the estimate and in
    every bootstrap replicate alike; never beyond the observed label counts.

    Args:
        active: The active learner's points, by increasing label count.
        random: The random-only learner at its largest label count (None: too few control labels).
        rng: Generator of the bootstrap.
        control_labels: Control labels stored (for the "needs more" message).
        n_boot: Bootstrap replicates (each resamples every point's evaluation items).
    """
    if random is None:
        need = max(0, MIN_CONTROL_LABELS - control_labels)
        return Savings(False, f"not estimable yet: {control_labels} control labels, the random-only learner needs "
                       f"{MIN_CONTROL_LABELS} ({need} more)", control_labels_needed=need)
    fit_P = monotone_fit([p.log_likelihood for p in active], [len(p.ll_I) for p in active])
    n_active, why = labels_to_reach([p.label_count for p in active], list(fit_P), random.log_likelihood)
    if n_active is None:
        return Savings(False, f"not estimable yet: {why}", random_labels=random.label_count,
                       log_likelihood=random.log_likelihood)
    share = 1.0 - n_active / random.label_count
    replicates_B = []
    for _ in range(n_boot):
        means = [_resampled_mean(p, rng) for p in active]
        r_ll = _resampled_mean(random, rng)
        s = _share(active, means, r_ll, random.label_count)
        if s is not None:
            replicates_B.append(s)
    if len(replicates_B) < n_boot // 2:
        return Savings(False, "not estimable yet: in most bootstrap replicates the curves do not cross within "
                       "the observed label counts (too few evaluation labels)", random_labels=random.label_count,
                       log_likelihood=random.log_likelihood)
    low, high = np.percentile(replicates_B, [2.5, 97.5])
    return Savings(True, "", 0, share, float(low), float(high), random.label_count, n_active, random.log_likelihood)


@dataclass(frozen=True)
class Gain:
    """The active learner's held-out log-likelihood minus the random-only learner's, at equal labels.

    Unlike the share of labels saved, which inverts a learning curve (ill-conditioned where the
    curve is flat), this difference is measured directly: it is the figure to read first while
    the labels are few.

    Attributes:
        estimable: Whether there is an estimate.
        reason: Why not.
        label_count: The random-only learner's label count, where both are compared.
        gain: Active minus random log-likelihood (nats per label) at `label_count`; the
            active learner's by linear interpolation between its two neighbouring versions.
        low: Lower end of the bootstrap 95% interval.
        high: Upper end.
    """

    estimable: bool
    reason: str = ""
    label_count: int = 0
    gain: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")


def _ll_at(active: Sequence[CurvePoint], means_P: Sequence[float], n: float) -> float:
    counts_P = [p.label_count for p in active]
    return float(np.interp(n, counts_P, means_P))


def estimate_gain(
    active: Sequence[CurvePoint], random: CurvePoint | None, rng: np.random.Generator, *, n_boot: int = BOOTSTRAP,
) -> Gain:
    """Active minus random held-out log-likelihood at the random-only learner's label count, with a 95% interval.

    Never extrapolated: the active curve must have versions at or below and at or above
    that label count.

    Args:
        active: The active learner's points, by increasing label count.
        random: The random-only learner at its largest label count (None: too few control labels).
        rng: Generator of the bootstrap.
        n_boot: Bootstrap replicates (each resamples every point's evaluation items).
    """
    if random is None:
        return Gain(False, f"not estimable yet: the random-only learner needs {MIN_CONTROL_LABELS} control labels")
    n = random.label_count
    if not active or active[0].label_count > n or active[-1].label_count < n:
        span = f"{active[0].label_count}-{active[-1].label_count}" if active else "none"
        return Gain(False, f"not estimable yet: the evaluated posterior versions (label counts {span}) do not "
                    f"bracket the random-only learner's {n} labels", label_count=n)
    gain = _ll_at(active, [p.log_likelihood for p in active], n) - random.log_likelihood
    boot_B = [
        _ll_at(active, [_resampled_mean(p, rng) for p in active], n) - _resampled_mean(random, rng)
        for _ in range(n_boot)
    ]
    low, high = np.percentile(boot_B, [2.5, 97.5])
    return Gain(True, "", n, float(gain), float(low), float(high))


class Recommendation(enum.Enum):
    """What the stopping signal advises."""

    CONTINUE = 1
    DIMINISHING = 2
    STOP = 3


@dataclass(frozen=True)
class Slope:
    """Held-out LL gained per 1,000 labels over the latest versions.

    Attributes:
        estimable: Whether there is a slope.
        reason: Why not.
        per_1k: Slope in nats per label per 1,000 labels.
        low: Lower end of its bootstrap 95% interval.
        high: Upper end.
    """

    estimable: bool
    reason: str = ""
    per_1k: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")


def _fit_slope(counts_P: np.ndarray, ll_P: np.ndarray) -> float:
    x_P = counts_P / 1000.0
    x_P = x_P - x_P.mean()
    return float((x_P * (ll_P - ll_P.mean())).sum() / (x_P * x_P).sum())


def estimate_slope(active: Sequence[CurvePoint], rng: np.random.Generator, *, n_boot: int = BOOTSTRAP) -> Slope:
    """Least-squares slope of held-out LL against label count over the latest `SLOPE_POINTS` versions."""
    pts = list(active)[-SLOPE_POINTS:]
    if len(pts) < MIN_SLOPE_POINTS:
        return Slope(False, f"not estimable yet: {len(pts)} evaluated posterior versions, needs {MIN_SLOPE_POINTS}")
    counts_P = np.array([p.label_count for p in pts], dtype=np.float64)
    if np.ptp(counts_P) == 0:
        return Slope(False, "not estimable yet: the evaluated versions were trained on the same label count")
    slope = _fit_slope(counts_P, np.array([p.log_likelihood for p in pts]))
    boot_B = [
        _fit_slope(counts_P, np.array([_resampled_mean(p, rng) for p in pts]))
        for _ in range(n_boot)
    ]
    low, high = np.percentile(boot_B, [2.5, 97.5])
    return Slope(True, "", slope, float(low), float(high))


def recommend(slope: Slope, threshold_per_1k: float) -> Recommendation | None:
    """STOP when even the interval's top is below the threshold, DIMINISHING when the slope is, else CONTINUE."""
    if not slope.estimable:
        return None
    if slope.high < threshold_per_1k:
        return Recommendation.STOP
    if slope.per_1k < threshold_per_1k:
        return Recommendation.DIMINISHING
    return Recommendation.CONTINUE
