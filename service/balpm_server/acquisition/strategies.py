"""Batch selection: RANDOM, BALD, stochastic BALD, BAL-PM, ENTROPY_ONLY and APL.

All strategies are pure: arrays and an explicit `np.random.Generator` in, a
`CandidateBatch` out. Ties are always broken by the lowest pool row.

Letter legend: N pool items, C candidates (rows where candidate_mask_N is True, ascending),
B batch, E ball entries of the kNN graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.special import digamma

from balpm_server.acquisition.apl import apl_certainty, apl_entropy
from balpm_server.acquisition.knn import KnnGraph, build_authors_knn
from balpm_server.acquisition.params import (
    APL_STRATEGIES,
    GRAPH_STRATEGIES,
    STOCHASTIC_BALD,
    AcquisitionParams,
    AplInputs,
    CandidateBatch,
    KnnConvention,
    Strategy,
)
from balpm_server.errors import FailedPrecondition, InvalidArgument

R_MIN = float(np.finfo(np.float64).tiny)
"""Floor of r_k inside log(2 r_k): duplicated prompts (r_k = 0) get a very low, finite term."""

AUTHORS_EPS = 1e-4
"""Additive epsilon of the authors' log(2 r_k + 1e-4) (KnnConvention.AUTHORS)."""


def ksg_entropy_term(
    radius_N: np.ndarray,
    count_N: np.ndarray,
    d_ent: float,
    convention: KnnConvention = KnnConvention.STANDARD,
) -> np.ndarray:
    """KSG entropy term of BAL-PM: log(2 max(r_k, R_MIN)) - psi(n + 1) / d_ent.

    Melo et al., "Deep Bayesian Active Learning for Preference Modeling in LLMs",
    NeurIPS 2024 (Kraskov-Stoegbauer-Grassberger estimator, Kraskov et al. 2004).
    With ``convention=AUTHORS`` the log term is the authors' log(2 r_k + 1e-4) instead.

    Args:
        radius_N: r_k of each point (in the given convention).
        count_N: Acquired points inside each closed ball.
        d_ent: Divisor of the digamma term.
        convention: Which log-radius term.

    Returns:
        entropy_N: float64.
    """
    return _entropy_from_log2r(_log2r(radius_N, convention), count_N, d_ent)


def _log2r(radius_N: np.ndarray, convention: KnnConvention) -> np.ndarray:
    r_N = np.asarray(radius_N, dtype=np.float64)
    if convention is KnnConvention.AUTHORS:
        return np.asarray(np.log(2.0 * r_N + AUTHORS_EPS))
    return np.asarray(np.log(2.0 * np.maximum(r_N, R_MIN)))


_PSI_TABLE = [digamma(np.arange(1, 1025, dtype=np.float64))]  # psi(n + 1) for n = 0..1023, grown on demand


def _psi_of_count(count_N: np.ndarray) -> np.ndarray:
    """psi(n + 1) of non-negative integer counts, by table look-up (the same values digamma gives)."""
    top = int(count_N.max(initial=0))
    table = _PSI_TABLE[0]
    if top >= table.size:
        table = digamma(np.arange(1, 2 * top + 2, dtype=np.float64))
        _PSI_TABLE[0] = table
    return np.asarray(table[count_N])


def _entropy_from_log2r(log2r_N: np.ndarray, count_N: np.ndarray, d_ent: float) -> np.ndarray:
    counts = np.asarray(count_N)
    if counts.dtype.kind in "iu" and (counts.size == 0 or int(counts.min()) >= 0):
        psi_N = _psi_of_count(counts)
    else:
        psi_N = digamma(np.asarray(counts, dtype=np.float64) + 1.0)
    return np.asarray(log2r_N - psi_N / d_ent, dtype=np.float64)


def top_b_desc(scores_C: np.ndarray, b: int) -> np.ndarray:
    """Positions of the `b` largest scores, descending, ties by lowest position."""
    neg_C = -np.asarray(scores_C, dtype=np.float64)
    if b <= 0:
        return np.zeros(0, dtype=np.int64)
    if b < len(neg_C):
        # O(C) selection, then a sort of only the b winners; same result as a stable argsort.
        kth = np.partition(neg_C, b - 1)[b - 1]
        if np.isfinite(kth):
            strict = np.flatnonzero(neg_C < kth)
            ties = np.flatnonzero(neg_C == kth)[: b - len(strict)]
            chosen = np.concatenate([strict, ties])
            return np.asarray(chosen[np.lexsort((chosen, neg_C[chosen]))], dtype=np.int64)
    order = np.argsort(neg_C, kind="stable")
    return np.asarray(order[:b], dtype=np.int64)


def stochastic_bald_keys(
    strategy: Strategy, epistemic_C: np.ndarray, temperature: float, gumbel_C: np.ndarray
) -> np.ndarray:
    """Perturbed keys of stochastic BALD; the batch is the top-B keys.

    Kirsch et al., "Stochastic Batch Acquisition: A Simple Baseline for Deep Active
    Learning", TMLR 2023, with beta = `temperature` and g ~ Gumbel(0, 1):
    SOFTMAX: beta * s + g; POWER: beta * log s + g (s floored at the smallest normal
    float); SOFTRANK: -beta * log rank + g, rank 1 = highest score (ties by lowest row).

    Args:
        strategy: SOFTMAX_BALD, POWER_BALD or SOFTRANK_BALD.
        epistemic_C: BALD scores of the candidates, ascending row order.
        temperature: beta.
        gumbel_C: Gumbel(0, 1) draws, one per candidate.

    Returns:
        keys_C: float64.
    """
    s = np.asarray(epistemic_C, dtype=np.float64)
    g = np.asarray(gumbel_C, dtype=np.float64)
    if strategy is Strategy.SOFTMAX_BALD:
        return np.asarray(temperature * s + g)
    if strategy is Strategy.POWER_BALD:
        return np.asarray(temperature * np.log(np.maximum(s, R_MIN)) + g)
    if strategy is Strategy.SOFTRANK_BALD:
        rank = np.empty(s.shape[0], dtype=np.float64)
        rank[top_b_desc(s, s.shape[0])] = np.arange(1, s.shape[0] + 1, dtype=np.float64)
        return np.asarray(-temperature * np.log(rank) + g)
    raise InvalidArgument(f"{strategy} is not a stochastic BALD strategy", field="strategy")


def greedy_balpm(
    graph: KnnGraph,
    *,
    batch_size: int,
    candidate_mask_N: np.ndarray,
    acquired_mask_N: np.ndarray,
    epistemic_N: np.ndarray | None,
    beta: float,
    d_ent: float,
    count_N: np.ndarray | None = None,
) -> CandidateBatch:
    """Greedy BAL-PM with incremental n(x) updates over the reverse kNN lists.

    Melo et al., NeurIPS 2024: score(x) = BALD(x) + beta * (log(2 r_k(x)) - psi(n(x)+1)/d_ent).
    Each step picks the best candidate (lowest row on ties), marks it acquired and
    increments n(x) only for the x whose ball holds the pick (its reverse list). The
    maximum is kept per block of rows, so a step costs O(N / S + S * touched blocks)
    with block size S ~ sqrt(N), instead of the reference's O(N * D).

    Args:
        graph: kNN balls of the pool.
        batch_size: B, at most the number of candidates.
        candidate_mask_N: Rows that may be picked; all of them members of `graph`.
        acquired_mask_N: Rows already acquired (labelled or leased); they count in n(x).
        epistemic_N: BALD scores, or None for the entropy term alone (epistemic 0).
        beta: Weight of the entropy term.
        d_ent: Divisor of psi(n + 1).
        count_N: n(x) of `graph` under `acquired_mask_N` when the caller keeps it current
            (`GreedyState.counts`); None computes it from the mask (O(E)). Not modified.

    Returns:
        The batch with total, epistemic and entropy components at pick time.
    """
    return _greedy(
        graph,
        _log2r(graph.radius_N, KnnConvention.STANDARD),
        count_N,  # GreedyState checks its shape, or counts it when None
        batch_size=batch_size,
        candidate_mask_N=candidate_mask_N,
        acquired_mask_N=acquired_mask_N,
        epistemic_N=epistemic_N,
        beta=beta,
        d_ent=d_ent,
    )


def greedy_balpm_authors(
    prompt_N_D: np.ndarray,
    k: int,
    *,
    batch_size: int,
    candidate_mask_N: np.ndarray,
    acquired_mask_N: np.ndarray,
    epistemic_N: np.ndarray | None,
    beta: float,
    d_ent: float,
    standardize: bool = False,
) -> CandidateBatch:
    """Greedy BAL-PM in the convention of the authors' released code (KnnConvention.AUTHORS).

    The population is this call's candidate rows: r_k(x) is the k-th smallest distance
    from x to the candidates with x itself included (its (k - 1)-th nearest other
    candidate), recomputed on every call; n(x) counts the acquired rows p != x with
    d(x, p) <= r_k(x); score(x) = BALD(x) + beta * (log(2 r_k(x) + 1e-4) - psi(n(x)+1)/d_ent).
    Same greedy as `greedy_balpm` (lowest row on ties, a pick joins the acquired set).

    Args:
        prompt_N_D: Prompt features of all N rows.
        k: The authors' k (at most the number of candidates).
        batch_size: B, at most the number of candidates.
        candidate_mask_N: Rows that may be picked; also the kNN population.
        acquired_mask_N: Rows already acquired; they count in n(x).
        epistemic_N: BALD scores, or None for the entropy term alone.
        beta: Weight of the entropy term.
        d_ent: Divisor of psi(n + 1).
        standardize: z-score features with the candidates' mean and std first.

    Returns:
        The batch with total, epistemic and entropy components at pick time.
    """
    graph, count_N = build_authors_knn(
        prompt_N_D, k, candidate_mask_N, acquired_mask_N, standardize=standardize
    )
    return _greedy(
        graph,
        _log2r(graph.radius_N, KnnConvention.AUTHORS),
        count_N,
        batch_size=batch_size,
        candidate_mask_N=candidate_mask_N,
        acquired_mask_N=acquired_mask_N,
        epistemic_N=epistemic_N,
        beta=beta,
        d_ent=d_ent,
    )


def _greedy(
    graph: KnnGraph,
    log2r_N: np.ndarray,
    count_N: np.ndarray | None,
    *,
    batch_size: int,
    candidate_mask_N: np.ndarray,
    acquired_mask_N: np.ndarray,
    epistemic_N: np.ndarray | None,
    beta: float,
    d_ent: float,
) -> CandidateBatch:
    """The greedy of `greedy_balpm` from a given log-radius term and initial n(x): one `GreedyState`, one pick."""
    state = GreedyState(graph, log2r_N, acquired_N=acquired_mask_N, open_N=candidate_mask_N, count_N=count_N)
    state.configure(epistemic_N, beta, d_ent)
    batch = state.pick(batch_size)
    if batch is None:
        raise FailedPrecondition(
            f"batch_size {batch_size} exceeds the {int(np.count_nonzero(state.open_N))} candidate items",
            field="batch_size",
            reason="BATCH_LARGER_THAN_POOL",
        )
    return batch


_Undo = tuple[np.ndarray, "int | np.ndarray", np.ndarray]


class GreedyState:
    """BAL-PM's greedy over a kNN graph, its state kept current across batches.

    Holds n(x) (acquired rows inside each ball), the entropy term and total score of
    every row, a key per row (its score while it is open, i.e. may be picked; -inf
    otherwise) and the largest key of each block of S ~ sqrt(N) rows. An occupancy event
    is recorded (`observe`, a dict write) and applied with the others at the next call
    (`flush`: one pass over the reverse lists of the rows that flipped), so a pool whose
    leases and labels change between calls is never rescored as a whole;
    `configure` rescores every row (O(N)) only when the BALD scores or beta / d_ent
    change. `pick` runs the greedy of Melo et al. (NeurIPS 2024) from the current state
    in O(B (N / S + S x touched blocks)): each step takes the largest key (lowest row on
    ties), closes it, marks it acquired and rescores the rows whose ball holds it. It
    then restores the state it found: the caller's leases of the picks update it
    through the same events. Every value is computed by the same expressions as a fresh
    state, so the batch equals that of a fresh greedy over the same masks (tested).

    Args:
        graph: kNN balls of the pool.
        log2r_N: The log-radius term of every row (`_log2r` of the graph's radii).
        acquired_N: bool [N], rows labelled or leased: they count in n(x).
        open_N: bool [N], rows that may be picked.
        count_N: n(x) under `acquired_N` when the caller has it; None counts it (O(E)).
    """

    def __init__(
        self,
        graph: KnnGraph,
        log2r_N: np.ndarray,
        *,
        acquired_N: np.ndarray,
        open_N: np.ndarray,
        count_N: np.ndarray | None = None,
    ) -> None:
        n = graph.n_items
        self.graph = graph
        self.log2r_N = np.asarray(log2r_N, dtype=np.float64)
        self.acquired_N = _mask(acquired_N, n, "acquired_mask_N").copy()
        self.open_N = _mask(open_N, n, "candidate_mask_N").copy()
        if count_N is None:
            self.count_N = graph.counts_inside(self.acquired_N)
        elif np.shape(count_N) != (n,):
            raise InvalidArgument(f"count_N must have shape ({n},), got {np.shape(count_N)}", field="count_N")
        else:
            self.count_N = np.array(count_N, dtype=np.int64, copy=True)
        self.members_N = graph.members()
        self.block = 1 << max(6, math.ceil(math.log2(max(1.0, math.sqrt(n)))))
        n_blocks = -(-n // self.block)
        self._key = np.full(n_blocks * self.block, -np.inf)
        self._key_blocks = self._key.reshape(n_blocks, self.block)
        self._block_max = np.full(n_blocks, -np.inf)
        self.epi_N = np.zeros(n, dtype=np.float64)
        self.ent_N = np.zeros(n, dtype=np.float64)
        self.tot_N = np.zeros(n, dtype=np.float64)
        self._scored_by: tuple[np.ndarray | None, float, float] | None = None
        self._undo: list[_Undo] | None = None  # while `pick` runs: old values, in write order
        self._pending: dict[int, tuple[bool, bool]] = {}  # row -> (acquired, open) observed, not yet applied

    @classmethod
    def standard(cls, graph: KnnGraph, *, acquired_N: np.ndarray, open_N: np.ndarray) -> GreedyState:
        """The state of the STANDARD convention: log(2 max(r_k, R_MIN)) of the graph's radii."""
        return cls(graph, _log2r(graph.radius_N, KnnConvention.STANDARD), acquired_N=acquired_N, open_N=open_N)

    def configure(self, epistemic_N: np.ndarray | None, beta: float, d_ent: float) -> None:
        """Score with these BALD scores (None: the entropy term alone) and parameters.

        O(1) when they are the last call's (the same array object: a new posterior brings
        a new one), else every row is rescored (O(N)).

        Raises:
            InvalidArgument: `epistemic_N` of the wrong shape or not finite on an open row.
        """
        self.flush()
        last = self._scored_by
        if last is not None and last[0] is epistemic_N and last[1] == beta and last[2] == d_ent:
            return
        n = self.graph.n_items
        if epistemic_N is None:
            epi_N = np.zeros(n, dtype=np.float64)
        else:
            epi_N = np.asarray(epistemic_N, dtype=np.float64)
            if epi_N.shape != (n,):
                raise InvalidArgument(f"epistemic_N must have shape ({n},), got {epi_N.shape}", field="epistemic_N")
            if not np.isfinite(epi_N[self.open_N]).all():
                raise InvalidArgument("epistemic scores of candidates must be finite", field="epistemic_N")
        self.epi_N = epi_N
        self.ent_N = _entropy_from_log2r(self.log2r_N, self.count_N, d_ent)
        self.tot_N = epi_N + beta * self.ent_N
        self._key[:n] = np.where(self.open_N, self.tot_N, -np.inf)
        self._block_max[:] = self._key_blocks.max(axis=1)
        self._scored_by = (epistemic_N, beta, d_ent)

    def observe(self, row: int, acquired: bool, full: bool) -> None:
        """An occupancy change of `row`: acquired (labelled or leased by anyone), full (nobody may be given it).

        Recorded, not applied: the next `flush` (every `pick`, `configure` and `counts`
        starts with one) applies the net change of every recorded row at once.
        """
        self._pending[row] = (acquired, bool(self.members_N[row]) and not full)

    def flush(self) -> None:
        """Apply the recorded occupancy changes: n(x) of every net flip's reverse list, then one rescore."""
        if not self._pending:
            return
        rows_R = np.fromiter(self._pending.keys(), dtype=np.int64, count=len(self._pending))
        state_R2 = np.array(list(self._pending.values()), dtype=bool).reshape(-1, 2)
        self._pending.clear()
        acq_R, open_R = state_R2[:, 0], state_R2[:, 1]
        reopened = open_R != self.open_N[rows_R]
        self.open_N[rows_R] = open_R
        flip = acq_R != self.acquired_N[rows_R]
        flipped_F = rows_R[flip]
        self.acquired_N[flipped_F] = acq_R[flip]
        ptr = self.graph.reverse_indptr
        len_F = ptr[flipped_F + 1] - ptr[flipped_F]
        if len_F.sum():
            # The reverse lists of the flipped rows, end to end, each entry with its row's sign.
            at_X = np.repeat(ptr[flipped_F] - np.cumsum(len_F) + len_F, len_F) + np.arange(int(len_F.sum()))
            xs_X = self.graph.reverse_indices[at_X]
            np.add.at(self.count_N, xs_X, np.repeat(np.where(acq_R[flip], 1, -1), len_F))
            if self._scored_by is not None:
                self._rescore(np.unique(xs_X))
        if self._scored_by is not None and reopened.any():
            moved = rows_R[reopened]
            self._key[moved] = np.where(self.open_N[moved], self.tot_N[moved], -np.inf)
            self._refresh_blocks(np.unique(moved // self.block))

    def counts(self) -> np.ndarray:
        """count_N: n(x) now (a copy)."""
        self.flush()
        return self.count_N.copy()

    def set_acquired(self, row: int, acquired: bool) -> None:
        """Record that `row` is acquired (True) or free (False): n(x) of its reverse list moves by one."""
        if bool(self.acquired_N[row]) == acquired:
            return
        self._put(self.acquired_N, row, acquired)
        xs = self.graph.reverse(row)
        if xs.size == 0:
            return
        self._put(self.count_N, xs, self.count_N[xs] + (1 if acquired else -1))
        if self._scored_by is not None:
            _epi, beta, d_ent = self._scored_by
            # psi(n + 1) grows with n: with beta >= 0 and d_ent > 0 a row turning acquired only lowers keys.
            self._rescore(xs, falling=acquired and beta >= 0.0 and d_ent > 0.0)

    def _rescore(self, xs: np.ndarray, *, falling: bool = False) -> None:
        """Entropy term, score and (open rows) key of the distinct rows `xs` from their n(x).

        With `falling` (no key can have risen) only the blocks whose maximum was one of the
        changed keys are recomputed; every other block keeps its maximum.
        """
        assert self._scored_by is not None
        _epi, beta, d_ent = self._scored_by
        ent_X = _entropy_from_log2r(self.log2r_N[xs], self.count_N[xs], d_ent)
        self._put(self.ent_N, xs, ent_X)
        self._put(self.tot_N, xs, self.epi_N[xs] + beta * ent_X)
        live = xs[self.open_N[xs]]
        if live.size:
            blocks = live // self.block
            if falling:
                blocks = blocks[self._key[live] == self._block_max[blocks]]
            self._put(self._key, live, self.tot_N[live])
            if blocks.size:
                self._refresh_blocks(np.unique(blocks))

    def set_open(self, row: int, is_open: bool) -> None:
        """Record that `row` may (True) or may not (False) be picked."""
        if bool(self.open_N[row]) == is_open:
            return
        self._put(self.open_N, row, is_open)
        if self._scored_by is not None:
            self._put(self._key, row, self.tot_N[row] if is_open else -np.inf)
            self._refresh_blocks(np.array([row // self.block]))

    def pick(self, batch_size: int, closed_R: np.ndarray | None = None) -> CandidateBatch | None:
        """The greedy batch from the current state, which is left unchanged.

        Args:
            batch_size: B.
            closed_R: Rows this caller may not be given although others may (consensus
                labelling: the ones it labelled or leases); closed for this pick only.

        Returns:
            The batch with total, epistemic and entropy components at pick time, or None
            when fewer than B rows are open.
        """
        if self._scored_by is None:
            raise FailedPrecondition("GreedyState.pick before configure", field="epistemic_N")
        self.flush()
        self._undo = []
        try:
            if closed_R is not None:
                for row in np.asarray(closed_R, dtype=np.int64).tolist():
                    self.set_open(row, False)
            idx_B = np.empty(batch_size, dtype=np.int64)
            tot_B = np.empty(batch_size, dtype=np.float64)
            epi_B = np.empty(batch_size, dtype=np.float64)
            ent_B = np.empty(batch_size, dtype=np.float64)
            for t in range(batch_size):
                b = int(np.argmax(self._block_max))
                if self._block_max[b] == -np.inf:
                    return None
                j = b * self.block + int(np.argmax(self._key_blocks[b]))
                idx_B[t], tot_B[t], epi_B[t], ent_B[t] = j, self.tot_N[j], self.epi_N[j], self.ent_N[j]
                self.set_open(j, False)
                self.set_acquired(j, True)
            return CandidateBatch(idx_B, tot_B, epi_B, ent_B)
        finally:
            undo, self._undo = self._undo, None
            for arr, idx, old in reversed(undo):
                arr[idx] = old

    def _put(self, arr: np.ndarray, idx: int | np.ndarray, values: object) -> None:
        if self._undo is not None:
            self._undo.append((arr, idx, np.array(arr[idx], copy=True)))
        arr[idx] = values

    def _refresh_blocks(self, blocks: np.ndarray) -> None:
        self._put(self._block_max, blocks, self._key_blocks[blocks].max(axis=1))


def _mask(x: np.ndarray, n: int | None, field: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        want = f"({n},)" if n is not None else "1-D"
        raise InvalidArgument(f"{field} must have shape {want}, got {arr.shape}", field=field)
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "iu" or not np.isin(arr, (0, 1)).all():
            raise InvalidArgument(f"{field} must be a boolean mask", field=field)
        arr = arr.astype(bool)
    return arr


def descending_order(scores_N: np.ndarray, rows_C: np.ndarray) -> np.ndarray:
    """`rows_C` ranked by descending score, ties by lowest row: the order `top_b_desc` uses.

    Computed once per posterior version, it turns BALD top-B into a walk from the front
    (`first_open`) that skips rows taken since, instead of an O(N) selection per call.
    """
    rows_C = np.sort(np.asarray(rows_C, dtype=np.int64))
    neg_C = -np.asarray(scores_N, dtype=np.float64)[rows_C]
    return np.asarray(rows_C[np.argsort(neg_C, kind="stable")], dtype=np.int64)


def first_open(
    order_R: np.ndarray, b: int, is_open: Callable[[np.ndarray], np.ndarray], *, chunk: int = 256
) -> np.ndarray:
    """The first `b` rows of `order_R` for which `is_open` holds, in order.

    `is_open` is evaluated on growing slices (chunk, 2 x chunk, ...), so the cost follows
    the number of rows looked at, not the length of the ranking. Returns fewer than `b`
    rows when the ranking runs out.
    """
    picked: list[np.ndarray] = []
    need, pos = b, 0
    while need > 0 and pos < order_R.size:
        rows_R = order_R[pos : pos + chunk]
        hit_R = rows_R[np.asarray(is_open(rows_R), dtype=bool)][:need]
        picked.append(hit_R)
        need -= hit_R.size
        pos += rows_R.size
        chunk *= 2
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


def sample_open(
    rng: np.random.Generator,
    rows_R: np.ndarray,
    want: int,
    is_open: Callable[[np.ndarray], np.ndarray],
    *,
    rounds: int = 4,
) -> np.ndarray | None:
    """`want` distinct rows drawn uniformly from those of `rows_R` for which `is_open` holds, by rejection.

    Each round draws 2 x (still wanted) + 8 rows of `rows_R` uniformly with replacement and
    keeps, in draw order, every open row not kept before: the first `want` distinct open
    rows of an i.i.d. uniform sequence are a uniform sample without replacement from the
    open rows. Costs O(draws) instead of the O(N) of a full mask.

    Returns:
        rows: int64 [want], in draw order, or None when `rounds` rounds did not find them
        (few rows open, or `rows_R` empty): draw from the full mask instead.
    """
    kept: list[int] = []
    seen: set[int] = set()
    if want <= 0:
        return np.zeros(0, dtype=np.int64)
    if rows_R.size == 0:
        return None
    for _ in range(rounds):
        draws_D = rows_R[rng.integers(0, rows_R.size, size=2 * (want - len(kept)) + 8)]
        for row, ok in zip(draws_D.tolist(), np.asarray(is_open(draws_D), dtype=bool).tolist(), strict=True):
            if ok and row not in seen:
                seen.add(row)
                kept.append(row)
                if len(kept) == want:
                    return np.asarray(kept, dtype=np.int64)
    return None


def select_batch(
    strategy: Strategy,
    *,
    batch_size: int,
    candidate_mask_N: np.ndarray,
    acquired_mask_N: np.ndarray,
    rng: np.random.Generator,
    params: AcquisitionParams,
    epistemic_N: np.ndarray | None = None,
    graph: KnnGraph | None = None,
    apl: AplInputs | None = None,
    prompt_N_D: np.ndarray | None = None,
    standardize_prompt: bool = False,
    count_N: np.ndarray | None = None,
) -> CandidateBatch:
    """Choose the next batch of pool rows to label.

    Strategies: RANDOM (uniform without replacement); BALD top-B (Houlsby et al. 2011);
    SOFTMAX/POWER/SOFTRANK_BALD (Kirsch et al., TMLR 2023); BALPM and ENTROPY_ONLY
    (Melo et al., NeurIPS 2024); APL_CERTAINTY/ENTROPY/HYBRID (Muldrew et al., ICML 2024).

    Randomness: RANDOM draws exactly ``rng.choice(rows_C, size=B, replace=False)``;
    stochastic BALD draws exactly ``rng.gumbel(size=C)`` (one per candidate, ascending
    row order); all other strategies draw nothing. A fixed seed gives the same batch.

    Args:
        strategy: Which heuristic.
        batch_size: B >= 1, at most the number of candidates.
        candidate_mask_N: Rows that may be picked (unlabelled, not leased to others).
        acquired_mask_N: Rows labelled or currently leased to anyone; they count in n(x)
            so concurrent batches are jointly diverse.
        rng: Source of all randomness.
        params: Strategy knobs.
        epistemic_N: BALD scores of the latest posterior; None when there is none yet
            (BAL-PM then uses the entropy term alone).
        graph: kNN graph of the prompt features (BALPM, ENTROPY_ONLY with
            ``params.knn_convention`` STANDARD; ignored with AUTHORS). Every candidate
            must be a member of it (a graph built with the SPLIT_POOL rows as members).
        apl: Log-probabilities (APL strategies).
        prompt_N_D: Prompt features of all N rows, [N, D]; needed (and used) only by
            BALPM and ENTROPY_ONLY with ``params.knn_convention`` AUTHORS, whose kNN
            population is this call's candidate rows.
        standardize_prompt: AUTHORS only: z-score `prompt_N_D` per dimension with the
            candidates' mean and std first (the pool's standardize_features).
        count_N: STANDARD graph strategies only: n(x) of `graph` under `acquired_mask_N`,
            kept current by the caller (`GreedyState.counts`); None computes it. The batch is
            the same either way.

    Returns:
        The batch, in pick order, with score components.

    Raises:
        InvalidArgument: Bad batch size, masks, scores, parameters, a missing graph, a
            candidate outside the graph's members (field candidate_mask_N, reason
            NOT_A_GRAPH_MEMBER), or missing prompt features for AUTHORS (field
            prompt_N_D, reason MISSING_PROMPT_FEATURES).
        FailedPrecondition: More requested than candidates (field batch_size), no
            posterior for a BALD strategy (reason NO_POSTERIOR), missing APL scores
            (reason MISSING_ITEM_SCORES), or, for AUTHORS, fewer than k candidates
            (field k, reason POOL_TOO_SMALL).
    """
    try:
        strategy = Strategy(strategy)
    except ValueError:
        raise InvalidArgument(f"unknown strategy {strategy!r}", field="strategy") from None
    params.validate()
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise InvalidArgument(f"batch_size must be at least 1, got {batch_size}", field="batch_size")
    b = int(batch_size)
    cand = _mask(candidate_mask_N, None, "candidate_mask_N")
    n = int(cand.shape[0])
    acq = _mask(acquired_mask_N, n, "acquired_mask_N")
    rows_C = np.flatnonzero(cand).astype(np.int64)
    if b > rows_C.size:
        raise FailedPrecondition(
            f"batch_size {b} exceeds the {rows_C.size} candidate items",
            field="batch_size",
            reason="BATCH_LARGER_THAN_POOL",
            metadata={"acquirable": str(rows_C.size)},
        )
    epi: np.ndarray | None = None
    if epistemic_N is not None:
        epi = np.asarray(epistemic_N, dtype=np.float64)
        if epi.shape != (n,):
            raise InvalidArgument(
                f"epistemic_N must have shape ({n},), got {epi.shape}", field="epistemic_N"
            )
        if not np.isfinite(epi[rows_C]).all():
            raise InvalidArgument("epistemic scores of candidates must be finite", field="epistemic_N")

    nan_B = np.full(b, np.nan)
    if strategy is Strategy.RANDOM:
        idx = np.asarray(rng.choice(rows_C, size=b, replace=False), dtype=np.int64)
        epi_B = epi[idx] if epi is not None else np.zeros(b)
        return CandidateBatch(idx, np.zeros(b), epi_B, nan_B)

    if strategy is Strategy.BALD or strategy in STOCHASTIC_BALD:
        if epi is None:
            raise FailedPrecondition(
                f"{strategy.value} needs a posterior; train one with UpdatePosterior first "
                "or use BALPM/ENTROPY_ONLY/RANDOM",
                field="strategy",
                reason="NO_POSTERIOR",
            )
        epi_C = epi[rows_C]
        if strategy is Strategy.BALD:
            pos = top_b_desc(epi_C, b)
            return CandidateBatch(rows_C[pos], epi_C[pos], epi_C[pos], nan_B)
        gumbel_C = rng.gumbel(size=rows_C.size)
        keys_C = stochastic_bald_keys(strategy, epi_C, params.temperature, gumbel_C)
        pos = top_b_desc(keys_C, b)
        return CandidateBatch(rows_C[pos], keys_C[pos], epi_C[pos], nan_B)

    if strategy in GRAPH_STRATEGIES and KnnConvention(params.knn_convention) is KnnConvention.AUTHORS:
        if prompt_N_D is None:
            raise InvalidArgument(
                f"{strategy.value} with knn_convention AUTHORS needs the prompt features (prompt_N_D)",
                field="prompt_N_D",
                reason="MISSING_PROMPT_FEATURES",
            )
        feats = np.asarray(prompt_N_D)
        if feats.ndim != 2 or feats.shape[0] != n:
            raise InvalidArgument(
                f"prompt_N_D must have shape ({n}, D), got {feats.shape}", field="prompt_N_D"
            )
        return greedy_balpm_authors(
            feats,
            int(params.k),
            batch_size=b,
            candidate_mask_N=cand,
            acquired_mask_N=acq,
            epistemic_N=epi if strategy is Strategy.BALPM else None,
            beta=float(params.beta),
            d_ent=float(params.d_ent),
            standardize=bool(standardize_prompt),
        )

    if strategy in GRAPH_STRATEGIES:
        if graph is None:
            raise InvalidArgument(f"{strategy.value} needs the pool's kNN graph", field="graph")
        if graph.n_items != n:
            raise InvalidArgument(
                f"kNN graph has {graph.n_items} items but the masks have {n}", field="graph"
            )
        if graph.k != int(params.k):
            raise InvalidArgument(
                f"kNN graph was built with k={graph.k} but params.k={params.k}", field="k"
            )
        if graph.member_mask_N is not None and not graph.members()[rows_C].all():
            raise InvalidArgument(
                "candidate rows must be members of the kNN graph (pool rows, not held-out rows)",
                field="candidate_mask_N",
                reason="NOT_A_GRAPH_MEMBER",
            )
        return greedy_balpm(
            graph,
            batch_size=b,
            candidate_mask_N=cand,
            acquired_mask_N=acq,
            epistemic_N=epi if strategy is Strategy.BALPM else None,
            beta=float(params.beta),
            d_ent=float(params.d_ent),
            count_N=count_N,
        )

    if strategy in APL_STRATEGIES:
        if apl is None:
            raise FailedPrecondition(
                f"{strategy.value} needs APL log-probabilities; upload them with UpdateItemScores",
                field="apl",
                reason="MISSING_ITEM_SCORES",
            )
        epi_of = (lambda r: epi[r]) if epi is not None else (lambda r: np.zeros(r.size))
        if strategy is Strategy.APL_CERTAINTY:
            cert_C = apl_certainty(apl, rows_C, n, float(params.apl_beta_dpo))
            pos = top_b_desc(cert_C, b)
            return CandidateBatch(rows_C[pos], cert_C[pos], epi_of(rows_C[pos]), nan_B)
        ent_C = apl_entropy(apl, rows_C, n)
        if strategy is Strategy.APL_ENTROPY:
            pos = top_b_desc(ent_C, b)
            return CandidateBatch(rows_C[pos], ent_C[pos], epi_of(rows_C[pos]), nan_B)
        s = int(params.apl_entropy_top_s) or 4 * b
        s = min(max(s, b), rows_C.size)
        rows_S = np.sort(rows_C[top_b_desc(ent_C, s)])
        cert_S = apl_certainty(apl, rows_S, n, float(params.apl_beta_dpo))
        pos = top_b_desc(cert_S, b)
        return CandidateBatch(rows_S[pos], cert_S[pos], epi_of(rows_S[pos]), nan_B)

    raise InvalidArgument(f"unknown strategy {strategy!r}", field="strategy")
