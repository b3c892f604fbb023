"""Value types of the acquisition engine: strategies, parameters, inputs and results.

Letter legend: N pool items, B batch.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from balpm_server.errors import InvalidArgument


class Strategy(str, enum.Enum):
    """Acquisition strategies the engine implements."""

    RANDOM = "RANDOM"
    BALD = "BALD"
    SOFTMAX_BALD = "SOFTMAX_BALD"
    POWER_BALD = "POWER_BALD"
    SOFTRANK_BALD = "SOFTRANK_BALD"
    BALPM = "BALPM"
    ENTROPY_ONLY = "ENTROPY_ONLY"
    APL_CERTAINTY = "APL_CERTAINTY"
    APL_ENTROPY = "APL_ENTROPY"
    APL_HYBRID = "APL_HYBRID"


STOCHASTIC_BALD = frozenset({Strategy.SOFTMAX_BALD, Strategy.POWER_BALD, Strategy.SOFTRANK_BALD})
APL_STRATEGIES = frozenset({Strategy.APL_CERTAINTY, Strategy.APL_ENTROPY, Strategy.APL_HYBRID})
GRAPH_STRATEGIES = frozenset({Strategy.BALPM, Strategy.ENTROPY_ONLY})


class KnnConvention(str, enum.Enum):
    """How BAL-PM's KSG entropy term measures r_k, and over which population.

    STANDARD: r_k(x) is the distance to the k-th nearest *other* point of the pool's
    kNN graph (all SPLIT_POOL rows, labelled or not; held-out rows never), built once
    per pool; the log term is log(2 max(r_k, tiny)).

    AUTHORS: parity with the BAL-PM authors' released code: r_k(x) is the k-th smallest
    distance with x itself included (so the (k - 1)-th nearest other point), over the
    currently unlabelled, unleased pool (the candidate rows), recomputed on every
    acquisition call; the log term is log(2 r_k + 1e-4).

    Both count in n(x) the acquired rows p != x with d(x, p) <= r_k(x).
    """

    STANDARD = "STANDARD"
    AUTHORS = "AUTHORS"


@dataclass(frozen=True)
class AcquisitionParams:
    """Knobs of the strategies; defaults follow the BAL-PM paper.

    Attributes:
        k: KSG neighbours of the entropy estimate (must match the graph's k).
        beta: Weight of the entropy term in BAL-PM.
        d_ent: Divisor of psi(n + 1); the reference code used 1, the derivation uses
            the feature dimension.
        temperature: Gumbel coldness beta of stochastic BALD (Kirsch et al. 2023).
        apl_beta_dpo: DPO beta of the implicit reward of APL.
        apl_entropy_top_s: S of APL_HYBRID; 0 means 4 * batch_size.
        knn_convention: r_k convention of the entropy term (BALPM, ENTROPY_ONLY).
    """

    k: int = 13
    beta: float = 0.01
    d_ent: float = 1.0
    temperature: float = 1.0
    apl_beta_dpo: float = 0.1
    apl_entropy_top_s: int = 0
    knn_convention: KnnConvention = KnnConvention.STANDARD

    def validate(self) -> None:
        """Raise InvalidArgument when a knob is out of range."""
        if int(self.k) < 1:
            raise InvalidArgument(f"k must be >= 1, got {self.k}", field="k")
        _finite(self.beta, "beta", allow_zero=True)
        _finite(self.d_ent, "d_ent", allow_zero=False)
        _finite(self.temperature, "temperature", allow_zero=False)
        _finite(self.apl_beta_dpo, "apl_beta_dpo", allow_zero=False)
        if int(self.apl_entropy_top_s) < 0:
            raise InvalidArgument(
                f"apl_entropy_top_s must be >= 0, got {self.apl_entropy_top_s}",
                field="apl_entropy_top_s",
            )
        try:
            KnnConvention(self.knn_convention)
        except ValueError:
            raise InvalidArgument(
                f"knn_convention must be one of {[c.value for c in KnnConvention]}, got {self.knn_convention!r}",
                field="knn_convention",
            ) from None


def _finite(value: float, field: str, *, allow_zero: bool) -> None:
    v = float(value)
    if not math.isfinite(v) or v < 0.0 or (v == 0.0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgument(f"{field} must be finite and {bound}, got {value}", field=field)


@dataclass(frozen=True, eq=False)
class AplInputs:
    """Per pool row log-probabilities for APL (Muldrew et al. 2024); NaN where unknown.

    Attributes:
        logp_policy_a_N: Sum log-prob of completion A given the prompt, policy model.
        logp_policy_b_N: Same for completion B.
        logp_ref_a_N: Sum log-prob of completion A given the prompt, reference model.
        logp_ref_b_N: Same for completion B.
        predictive_entropy_N: Optional -1/n sum log pi(y_n | x) precomputed by the client.
    """

    logp_policy_a_N: np.ndarray
    logp_policy_b_N: np.ndarray
    logp_ref_a_N: np.ndarray
    logp_ref_b_N: np.ndarray
    predictive_entropy_N: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class CandidateBatch:
    """The chosen batch and the score components of each pick.

    Attributes:
        indices_B: int64 pool rows, in pick order.
        total_B: float64 score of each pick at the moment it was picked.
        epistemic_B: BALD term (0 where no posterior or where the strategy ignores it).
        entropy_B: Raw KSG entropy term log(2 r_k) - psi(n + 1) / d_ent at pick time
            (log(2 r_k + 1e-4) with KnnConvention.AUTHORS; NaN for strategies without it);
            total = epistemic + beta * entropy for BAL-PM.
    """

    indices_B: np.ndarray
    total_B: np.ndarray
    epistemic_B: np.ndarray
    entropy_B: np.ndarray

    def __len__(self) -> int:
        return int(self.indices_B.shape[0])
