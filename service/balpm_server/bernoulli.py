"""Bernoulli quantities of an ensemble's predictions: entropy, the BALD decomposition, log-likelihood.

The one implementation of each formula: AcquireBatch's BALD scores, Predict's
epistemic and aleatoric terms and Evaluate's log-likelihood and mean epistemic all call
these functions, so the RPCs cannot disagree. Pure numpy; no I/O, no state.

Predictive decomposition (Houlsby et al., "Bayesian Active Learning for
Classification and Preference Learning", 2011; Depeweg et al., ICML 2018), with the
outcome y ~ Bernoulli(p_e) under ensemble member e and H the binary entropy in nats:

    total     = H[mean_e p_e]            (predictive entropy)
    aleatoric = mean_e H[p_e]            (expected entropy)
    epistemic = total - aleatoric        (BALD: mutual information I[y; theta])

Numerics:
    * Entropies are exact at the ends, with no clipping: ``H(p) = -(xlogy(p, p) +
      xlog1py(1 - p, -p))``, i.e. ``0 log 0 = 0`` and ``log1p(-p)`` for the second
      term, accurate for p near 0. Clipping p to [eps, 1 - eps] would give a certain
      member (p = 0 or 1, common with saturated sigmoids) an entropy of about
      ``eps * (1 - log eps)`` (1.7e-6 nats at eps = 1e-7), a bias that does not cancel in
      the difference and is of the size of the BALD gaps acquisition ranks on.
    * The epistemic term is clipped at 0 against rounding (it is >= 0 by Jensen).
    * The log-likelihood needs ``log p`` of the predicted side, which is -inf at a
      certain wrong prediction: there, and only there, p is clipped once, to
      [`LOG_LIKELIHOOD_EPS`, 1 - `LOG_LIKELIHOOD_EPS`], so one pair costs at most
      ``-log(1e-12)`` = 27.6 nats.

Letter legend: N items (preference pairs), E ensemble members.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import xlog1py, xlogy

from balpm_server.errors import InvalidArgument

LOG_LIKELIHOOD_EPS = 1e-12


@dataclass(frozen=True)
class Decomposition:
    """The predictive decomposition of every item (nats; float64 `[N]`).

    Attributes:
        mean_N: Ensemble-mean P(A preferred).
        total_N: Entropy of the mean prediction.
        aleatoric_N: Mean of the members' entropies.
        epistemic_N: BALD mutual information, total - aleatoric clipped at 0.
    """

    mean_N: np.ndarray
    total_N: np.ndarray
    aleatoric_N: np.ndarray
    epistemic_N: np.ndarray


def check_probs(probs_N_E: np.ndarray, field: str = "probs") -> np.ndarray:
    """The members' probabilities as float64 `[N, E]`.

    Raises:
        InvalidArgument: Not an [N, E] array with E >= 1 of finite values in [0, 1].
    """
    probs = np.asarray(probs_N_E, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise InvalidArgument(f"{field} must be an [N, E] array with E >= 1, got shape {probs.shape}", field=field)
    if not np.isfinite(probs).all() or (probs < 0.0).any() or (probs > 1.0).any():
        raise InvalidArgument(f"{field} must be finite and in [0, 1]", field=field)
    return probs


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of Bernoulli(p), elementwise, exact at 0 and 1 (no clipping)."""
    p = np.asarray(p, dtype=np.float64)
    return np.asarray(-(xlogy(p, p) + xlog1py(1.0 - p, -p)), dtype=np.float64)


def decompose(probs_N_E: np.ndarray) -> Decomposition:
    """Total, aleatoric and epistemic uncertainty of each item from its members' predictions.

    Args:
        probs_N_E: P(A preferred) of each item under each ensemble member, in [0, 1].

    Raises:
        InvalidArgument: See `check_probs`.
    """
    probs = check_probs(probs_N_E)
    mean_N = probs.mean(axis=1)
    total_N = binary_entropy(mean_N)
    aleatoric_N = binary_entropy(probs).mean(axis=1)
    return Decomposition(mean_N, total_N, aleatoric_N, np.maximum(total_N - aleatoric_N, 0.0))


def bald(probs_N_E: np.ndarray) -> np.ndarray:
    """BALD mutual information (nats, >= 0) of each item: `decompose(probs_N_E).epistemic_N`.

    Houlsby et al. 2011, as used by BAL-PM (Melo et al., NeurIPS 2024).

    Args:
        probs_N_E: P(A preferred) of each item under each ensemble member, in [0, 1].

    Returns:
        epistemic_N: float64 scores, >= 0.

    Raises:
        InvalidArgument: See `check_probs`.
    """
    return decompose(probs_N_E).epistemic_N


def log_likelihood(p_N: np.ndarray, targets_N: np.ndarray) -> np.ndarray:
    """Bernoulli log-likelihood (nats) of soft targets under predicted probabilities, per item.

    ``t log p + (1 - t) log(1 - p)`` with p clipped to [`LOG_LIKELIHOOD_EPS`, 1 -
    `LOG_LIKELIHOOD_EPS`]; a tie (t = 0.5) scores the Bernoulli cross-entropy of 0.5.

    Args:
        p_N: Predicted P(A preferred).
        targets_N: Observed P(A preferred): 1.0, 0.0 or 0.5.
    """
    q_N = np.clip(np.asarray(p_N, dtype=np.float64), LOG_LIKELIHOOD_EPS, 1.0 - LOG_LIKELIHOOD_EPS)
    t_N = np.asarray(targets_N, dtype=np.float64)
    return np.asarray(t_N * np.log(q_N) + (1.0 - t_N) * np.log1p(-q_N), dtype=np.float64)
