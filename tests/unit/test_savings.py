"""posterior.savings: equal-LL label counts, the saving with its interval, the slope and the recommendation."""

from __future__ import annotations

import numpy as np
import pytest

from balpm_server.posterior.savings import (
    MIN_CONTROL_LABELS,
    CurvePoint,
    Recommendation,
    Slope,
    estimate_gain,
    estimate_savings,
    estimate_slope,
    group_folds,
    labels_to_reach,
    monotone_fit,
    point,
    recommend,
)


def _pt(n: int, mean: float, items: int = 400, seed: int = 0, sd: float = 0.3) -> CurvePoint:
    rng = np.random.default_rng(seed + n)
    ll_I = rng.normal(0.0, sd, size=items)
    ll_I = ll_I - ll_I.mean() + mean  # exactly this mean
    return CurvePoint(n, 1, ll_I, np.ones(items))


def test_labels_to_reach_interpolates_and_never_extrapolates() -> None:
    n, why = labels_to_reach([100, 200, 300], [-0.7, -0.6, -0.55], -0.65)
    assert n == pytest.approx(150.0) and why == ""
    n, why = labels_to_reach([100, 200], [-0.5, -0.4], -0.6)
    assert n is None and "already reaches" in why
    n, why = labels_to_reach([100, 200], [-0.7, -0.65], -0.6)
    assert n is None and "not reached" in why
    assert labels_to_reach([], [], -0.6)[0] is None


def test_the_saving_and_its_interval_cover_the_truth() -> None:
    active = [_pt(50, -0.69, sd=0.1), _pt(100, -0.62, sd=0.1), _pt(150, -0.58, sd=0.1), _pt(200, -0.56, sd=0.1)]
    random = _pt(200, -0.60, items=200, sd=0.1)  # the active learner reaches -0.60 at 125 labels
    s = estimate_savings(active, random, np.random.default_rng(0), control_labels=250)
    assert s.estimable and s.share == pytest.approx(1 - 125 / 200)
    assert s.low < s.share < s.high and s.high - s.low < 0.3
    again = estimate_savings(active, random, np.random.default_rng(0), control_labels=250)
    assert (again.low, again.high) == (s.low, s.high)  # seeded: deterministic


def test_the_saving_reads_the_monotone_fit_of_a_noisy_curve() -> None:
    np.testing.assert_allclose(monotone_fit([-0.60, -0.66, -0.62, -0.58], [1, 1, 1, 1]), [-0.63, -0.63, -0.62, -0.58])
    np.testing.assert_allclose(monotone_fit([-0.60, -0.66], [3, 1]), [-0.615, -0.615])
    np.testing.assert_allclose(monotone_fit([-0.7, -0.6, -0.5], [1, 2, 3]), [-0.7, -0.6, -0.5])
    assert monotone_fit([], []).size == 0
    # Raw, the spike at 100 labels would already "reach" -0.61 (not estimable); the fit pools it with the dip at 150.
    active = [_pt(100, -0.60), _pt(150, -0.66), _pt(200, -0.62), _pt(250, -0.58)]
    s = estimate_savings(active, _pt(200, -0.61, items=300), np.random.default_rng(0), control_labels=250)
    assert s.estimable and s.active_labels == pytest.approx(212.5) and s.share == pytest.approx(1 - 212.5 / 200)


def test_not_estimable_below_the_minimum_or_before_the_curves_cross() -> None:
    s = estimate_savings([_pt(100, -0.6)], None, np.random.default_rng(0), control_labels=12)
    assert not s.estimable and s.control_labels_needed == MIN_CONTROL_LABELS - 12 and "needs 50" in s.reason
    worse = estimate_savings([_pt(100, -0.7), _pt(200, -0.68)], _pt(160, -0.6), np.random.default_rng(0),
                             control_labels=200)
    assert not worse.estimable and "has not reached" in worse.reason


def test_slope_and_recommendation() -> None:
    flat = [_pt(n, -0.55 + 0.001 * n / 1000) for n in (1000, 2000, 3000, 4000)]  # +0.001 per 1k labels
    s = estimate_slope(flat, np.random.default_rng(0))
    assert s.estimable and s.per_1k == pytest.approx(0.001)
    assert recommend(Slope(True, "", 0.001, -0.01, 0.004), 0.005) is Recommendation.STOP
    assert recommend(Slope(True, "", 0.004, -0.01, 0.02), 0.005) is Recommendation.DIMINISHING
    assert recommend(Slope(True, "", 0.02, 0.01, 0.03), 0.005) is Recommendation.CONTINUE
    assert recommend(estimate_slope(flat[:2], np.random.default_rng(0)), 0.005) is None


def test_point_scores_log_likelihood_and_accuracy_without_ties() -> None:
    p = point(10, 2, np.array([0.9, 0.2, 0.7]), np.array([1.0, 1.0, 0.5]))
    assert p.ll_I[0] == pytest.approx(np.log(0.9)) and p.accuracy == 0.5 and len(p.ll_I) == 3


def test_the_gain_at_equal_labels_interpolates_the_active_curve_and_never_extrapolates() -> None:
    active = [_pt(50, -0.69, sd=0.1), _pt(100, -0.62, sd=0.1), _pt(150, -0.58, sd=0.1)]
    g = estimate_gain(active, _pt(125, -0.63, items=200, sd=0.1), np.random.default_rng(0))
    assert g.estimable and g.label_count == 125 and g.gain == pytest.approx(-0.60 + 0.63)
    assert g.low < g.gain < g.high and g.high - g.low < 0.05
    again = estimate_gain(active, _pt(125, -0.63, items=200, sd=0.1), np.random.default_rng(0))
    assert (again.low, again.high) == (g.low, g.high)
    beyond = estimate_gain(active, _pt(160, -0.6), np.random.default_rng(0))
    assert not beyond.estimable and "do not bracket" in beyond.reason
    before = estimate_gain([_pt(130, -0.6), _pt(200, -0.55)], _pt(125, -0.6), np.random.default_rng(0))
    assert not before.estimable
    assert not estimate_gain(active, None, np.random.default_rng(0)).estimable


def test_the_gain_interval_covers_the_true_gain_across_resampled_evaluation_sets() -> None:
    """95% intervals from evaluation sets drawn afresh cover the true difference about 95% of the time."""
    rng = np.random.default_rng(7)
    truth = -0.60 - (-0.63)
    covered = 0
    trials = 200
    for t in range(trials):
        def draw(n: int, mean: float, items: int) -> CurvePoint:
            return CurvePoint(n, 1, rng.normal(mean, 0.3, size=items), np.ones(items))

        active = [draw(100, -0.62, 150), draw(150, -0.58, 150)]
        g = estimate_gain(active, draw(125, -0.63, 120), np.random.default_rng(t), n_boot=200)
        covered += g.low <= truth <= g.high
    assert 0.90 <= covered / trials <= 0.99, covered


def test_folds_keep_a_prompts_comparisons_together() -> None:
    group_C = np.repeat(np.arange(40), 4)[np.random.default_rng(1).permutation(160)]
    fold_C = group_folds(group_C, 5, np.random.default_rng(0))
    for g in range(40):
        assert np.unique(fold_C[group_C == g]).size == 1
    assert sorted(np.bincount(fold_C).tolist()) == [32] * 5  # 8 groups of 4 per fold
    assert np.array_equal(fold_C, group_folds(group_C, 5, np.random.default_rng(0)))
