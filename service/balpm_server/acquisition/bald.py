"""BALD mutual information of a Bernoulli preference outcome from ensemble predictions.

BALD (Houlsby et al., "Bayesian Active Learning for Classification and Preference
Learning", 2011): I[y; theta | x] = H[E_theta p(y | x, theta)] - E_theta H[p(y | x, theta)].

Letter legend: N pool items, E ensemble members.
"""

from __future__ import annotations

import numpy as np
from scipy.special import entr

from balpm_server.errors import InvalidArgument


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of Bernoulli(p), with 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    return np.asarray(entr(p) + entr(1.0 - p), dtype=np.float64)


def bald_from_probs(probs_N_E: np.ndarray) -> np.ndarray:
    """BALD mutual information (nats) of a Bernoulli outcome.

    Houlsby et al. 2011, as used by BAL-PM (Melo et al., NeurIPS 2024):
    H[mean_e p_e] - mean_e H[p_e], clipped at 0 against rounding.

    Args:
        probs_N_E: P(A preferred) of every pool item under each ensemble member, in [0, 1].

    Returns:
        epistemic_N: float64 scores, >= 0.

    Raises:
        InvalidArgument: Not a finite [N, E] array with E >= 1 and values in [0, 1].
    """
    probs = np.asarray(probs_N_E, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise InvalidArgument(
            f"probs must be an [N, E] array with E >= 1, got shape {probs.shape}", field="probs"
        )
    if not np.isfinite(probs).all() or (probs < 0.0).any() or (probs > 1.0).any():
        raise InvalidArgument("probs must be finite and in [0, 1]", field="probs")
    mean_N = probs.mean(axis=1)
    mi_N = binary_entropy(mean_N) - binary_entropy(probs).mean(axis=1)
    return np.maximum(mi_N, 0.0)
