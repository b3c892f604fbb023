"""Evaluation of an ensemble posterior and its epistemic uncertainty (BALD).

BALD (Houlsby et al., 2011), as used by BAL-PM (Melo et al., NeurIPS 2024), scores
a pair by the mutual information between its label and the model parameters:
``I = H[mean_e p_e] - mean_e H[p_e]`` with the binary entropy H in nats. That formula
and the Bernoulli log-likelihood have one implementation, `balpm_server.bernoulli`,
shared with acquisition and Predict.

Shape legend:
    N  items (preference pairs)
    E  ensemble members
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from balpm_server import bernoulli, errors

ECE_BINS = 15


@dataclass(frozen=True)
class EvalMetrics:
    """Quality of the ensemble-mean prediction.

    Attributes:
        log_likelihood: Mean per-pair log-likelihood in nats (`bernoulli.log_likelihood`;
            ties with target 0.5 use the Bernoulli cross-entropy ``0.5 log p + 0.5 log(1 - p)``).
        accuracy: Fraction of non-tie pairs whose preferred side has mean p > 0.5
            (NaN when every pair is a tie).
        brier: Mean squared error ``(p - t)^2``.
        ece: Expected calibration error of P(A preferred) with 15 equal-width bins:
            ``sum_b n_b / N * |mean_b p - mean_b t|`` (ties count as frequency 0.5).
        mean_epistemic: Mean BALD mutual information (nats, `bernoulli.decompose`).
        count: Number of pairs N.
    """

    log_likelihood: float
    accuracy: float
    brier: float
    ece: float
    mean_epistemic: float
    count: int


def expected_calibration_error(p_N: np.ndarray, t_N: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of probabilities ``p_N`` against (soft) outcomes ``t_N``, equal-width bins on [0, 1].

    A probability exactly on an inner edge goes to the upper bin; 1.0 goes to the last bin.
    """
    if len(p_N) == 0:
        return math.nan
    bin_N = np.minimum((p_N * bins).astype(np.int64), bins - 1)
    p_sum_K = np.bincount(bin_N, weights=p_N, minlength=bins)
    t_sum_K = np.bincount(bin_N, weights=t_N, minlength=bins)
    return float(np.abs(p_sum_K - t_sum_K).sum() / len(p_N))


def evaluate(probs_N_E: np.ndarray, targets_N: np.ndarray) -> EvalMetrics:
    """Metrics of the ensemble-mean prediction against targets.

    Args:
        probs_N_E: P(A preferred) per member.
        targets_N: P(A preferred) labels: 1.0, 0.0 or 0.5 (tie).

    Returns:
        The metrics (all NaN and count 0 for N = 0).

    Raises:
        errors.InvalidArgument: Shape mismatch, NaN, values outside [0, 1].
    """
    probs_N_E = bernoulli.check_probs(probs_N_E)
    t_N = np.asarray(targets_N, dtype=np.float64)
    N = probs_N_E.shape[0]
    if t_N.shape != (N,):
        raise errors.InvalidArgument(f"targets shape {t_N.shape} != ({N},)", field="targets")
    if not np.isfinite(t_N).all() or ((t_N < 0) | (t_N > 1)).any():
        raise errors.InvalidArgument("targets must be probabilities in [0, 1]", field="targets")
    if N == 0:
        return EvalMetrics(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
    d = bernoulli.decompose(probs_N_E)
    p_N = d.mean_N
    log_lik = float(np.mean(bernoulli.log_likelihood(p_N, t_N)))
    decided = t_N != 0.5
    accuracy = (float(np.mean((p_N[decided] > 0.5) == (t_N[decided] > 0.5)))
                if decided.any() else math.nan)
    brier = float(np.mean((p_N - t_N) ** 2))
    ece = expected_calibration_error(p_N, t_N)
    return EvalMetrics(log_lik, accuracy, brier, ece, float(d.epistemic_N.mean()), N)
