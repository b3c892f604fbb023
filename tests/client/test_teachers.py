"""The model oracle's two teachers: the temperature fit and what distinguishes them (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest

from balpm.oracles import TEACHERS, NearLinearTeacher, PairFeatures, RewardTeacher

pytestmark = pytest.mark.unit


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)) + 0.5  # sentence embeddings: unit norm, a shared direction
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _pairs(seed: int = 0, n: int = 4000, d: int = 64) -> PairFeatures:
    rng = np.random.default_rng(seed)
    prompt = _unit_rows(rng, n, d)
    return PairFeatures(prompt, _unit_rows(rng, n, d), _unit_rows(rng, n, d))


def _linear_r2(margin_N: np.ndarray, diff_N_D: np.ndarray) -> float:
    """Share of the margin's variance a least-squares linear function of (a - b) explains."""
    coef, *_ = np.linalg.lstsq(diff_N_D, margin_N, rcond=None)
    resid = margin_N - diff_N_D @ coef
    return float(1.0 - resid.var() / margin_N.var())


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_each_teacher_is_fitted_to_the_requested_agreement(name: str) -> None:
    feats = _pairs()
    teacher = TEACHERS[name](64, seed=3).fit(feats, 0.89)
    assert teacher.expected_agreement(feats) == pytest.approx(0.89, abs=1e-3)
    draws = teacher.sample(feats, np.random.default_rng(0))
    argmax = np.where(teacher.prob_a(feats) > 0.5, "A", "B")
    assert abs(float(np.mean(np.array(draws) == argmax)) - 0.89) < 0.02


def test_the_near_linear_teacher_is_near_linear_and_the_reward_teacher_is_not() -> None:
    feats = _pairs(1)
    diff = (feats.a_N_D - feats.b_N_D).astype(np.float64)
    near = NearLinearTeacher(64, seed=0).fit(feats, 0.89)
    reward = RewardTeacher(64, seed=0).fit(feats, 0.89)
    r2_near, r2_reward = _linear_r2(near.margin(feats), diff), _linear_r2(reward.margin(feats), diff)
    # Measured on these rows: 0.993 and 0.924 (on MiniLM features of HH prompts the issue measured 0.92 / 0.70).
    assert r2_near > 0.98 and r2_reward < r2_near - 0.05, (r2_near, r2_reward)
