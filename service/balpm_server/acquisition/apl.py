"""APL acquisition scores (Muldrew et al., "Active Preference Learning for Large Language
Models", ICML 2024).

Certainty: the magnitude of the difference of DPO implicit rewards of the two
completions, |r(x, y_a) - r(x, y_b)| with r = beta_dpo * (log pi(y | x) - log pi_ref(y | x)).
Entropy: the policy's predictive entropy of the prompt, -1/n sum_n log pi(y_n | x), by
default estimated from the pair's two completions.

Letter legend: N pool items, C candidates.
"""

from __future__ import annotations

import numpy as np

from balpm_server.acquisition.params import AplInputs
from balpm_server.errors import FailedPrecondition, InvalidArgument


def _column(x: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if x is None:
        return np.full(n, np.nan)
    arr = np.asarray(x, dtype=np.float64)
    if arr.shape != (n,):
        raise InvalidArgument(f"apl.{name} must have shape ({n},), got {arr.shape}", field="apl")
    return arr


def _missing(rows_C: np.ndarray, what: str) -> FailedPrecondition:
    shown = ", ".join(str(int(r)) for r in rows_C[:5])
    return FailedPrecondition(
        f"APL {what} are missing for {rows_C.size} candidate rows (e.g. {shown}); "
        "upload them with UpdateItemScores",
        field="apl",
        reason="MISSING_ITEM_SCORES",
        metadata={"missing_count": str(rows_C.size)},
    )


def apl_certainty(apl: AplInputs, rows_C: np.ndarray, n: int, beta_dpo: float) -> np.ndarray:
    """|r(x, y_a) - r(x, y_b)| of `rows_C`, r = beta_dpo * (logp_policy - logp_ref).

    Raises:
        FailedPrecondition: A log-probability of a row in `rows_C` is NaN/inf.
    """
    pa = _column(apl.logp_policy_a_N, n, "logp_policy_a_N")[rows_C]
    pb = _column(apl.logp_policy_b_N, n, "logp_policy_b_N")[rows_C]
    ra = _column(apl.logp_ref_a_N, n, "logp_ref_a_N")[rows_C]
    rb = _column(apl.logp_ref_b_N, n, "logp_ref_b_N")[rows_C]
    ok = np.isfinite(pa) & np.isfinite(pb) & np.isfinite(ra) & np.isfinite(rb)
    if not ok.all():
        raise _missing(rows_C[~ok], "log-probabilities (policy and reference)")
    reward_a = beta_dpo * (pa - ra)
    reward_b = beta_dpo * (pb - rb)
    return np.asarray(np.abs(reward_a - reward_b), dtype=np.float64)


def apl_entropy(apl: AplInputs, rows_C: np.ndarray, n: int) -> np.ndarray:
    """Predictive entropy of `rows_C`: the client's value, else -(logp_a + logp_b) / 2.

    Raises:
        FailedPrecondition: Neither estimate is available for a row in `rows_C`.
    """
    given = _column(apl.predictive_entropy_N, n, "predictive_entropy_N")[rows_C]
    pa = _column(apl.logp_policy_a_N, n, "logp_policy_a_N")[rows_C]
    pb = _column(apl.logp_policy_b_N, n, "logp_policy_b_N")[rows_C]
    mc = -(pa + pb) / 2.0
    ent = np.where(np.isfinite(given), given, mc)
    ok = np.isfinite(ent)
    if not ok.all():
        raise _missing(rows_C[~ok], "predictive entropies (or policy log-probabilities)")
    return np.asarray(ent, dtype=np.float64)
