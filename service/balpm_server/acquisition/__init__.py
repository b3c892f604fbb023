"""Pure, seeded acquisition engine: which preference pairs to label next.

Strategies: RANDOM, BALD, stochastic BALD (softmax/power/softrank), BAL-PM and its
entropy-only ablation, and APL (certainty/entropy/hybrid). Nothing here keeps state
across calls except the `KnnGraph` a caller builds once per pool and the `GreedyState`
it may keep current with its occupancy events.

Letter legend: N pool items, E ensemble members, B batch, D feature dim, K neighbours.
"""

from balpm_server.acquisition.bald import bald_from_probs, binary_entropy
from balpm_server.acquisition.knn import (
    KnnGraph,
    build_authors_knn,
    build_knn_graph,
    can_extend,
    extend_knn_graph,
    pair_dist,
)
from balpm_server.acquisition.params import (
    AcquisitionParams,
    AplInputs,
    CandidateBatch,
    KnnConvention,
    Strategy,
)
from balpm_server.acquisition.strategies import (
    GreedyState,
    descending_order,
    first_open,
    greedy_balpm,
    greedy_balpm_authors,
    ksg_entropy_term,
    sample_open,
    select_batch,
    stochastic_bald_keys,
)

__all__ = [
    "AcquisitionParams",
    "AplInputs",
    "CandidateBatch",
    "GreedyState",
    "KnnConvention",
    "KnnGraph",
    "Strategy",
    "bald_from_probs",
    "binary_entropy",
    "build_authors_knn",
    "build_knn_graph",
    "can_extend",
    "descending_order",
    "extend_knn_graph",
    "first_open",
    "greedy_balpm",
    "greedy_balpm_authors",
    "ksg_entropy_term",
    "pair_dist",
    "sample_open",
    "select_batch",
    "stochastic_bald_keys",
]
