"""k-nearest-neighbour graph of a pool's prompt features, built once and reused.

The KSG entropy term of BAL-PM (Melo et al., NeurIPS 2024) needs, for every pool point x,
the radius r_k(x) of the ball holding its k nearest other pool points, and the number
n(x) of acquired points inside that closed ball. A point p can only be inside the ball
of x when p is one of x's "ball members"; the graph stores these member lists (CSR) and
their reverse lists, so an acquisition of p touches exactly the points whose ball holds p.

Exactness: candidates come from FAISS (float32); every candidate distance is recomputed
in float64 with `pair_dist` from the caller's features, r_k(x) is the k-th smallest of
them (self excluded by id, duplicates of x included), and the ball holds every candidate
with distance <= r_k(x) (closed ball, exact ties included). When all retrieved candidates
are inside the ball (large groups of duplicates or tied points) the row is searched again
with twice as many neighbours until the ball is closed; in exact mode this makes the
members exactly {p != x : d(x, p) <= r_k(x)} (widening stops at 2048 neighbours on GPU and
4096 in approximate HNSW mode).

Members: a graph may be built over a subset of the rows (`member_mask_N`, e.g. only the
SPLIT_POOL rows, never the held-out ones) while keeping the row numbering of all N rows,
so the caller's masks still line up. A non-member row has no ball (radius NaN), lies in no
other row's ball and plays no part in the standardisation statistics: over the members
the graph is exactly the graph of the member rows alone, re-indexed.

Two conventions of r_k (see `KnnConvention`): the graph of `build_knn_graph` uses the
standard one (k nearest *other* members); `build_authors_knn` builds, per acquisition
call, the BAL-PM authors' one (k-th smallest distance with the point itself included,
over the current candidate rows).

Letter legend: N pool items, D feature dim, K neighbours (candidates per row), E ball
entries (sum of ball sizes), R rows of a chunk.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from balpm_server.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

_SLACK = 8  # extra neighbours fetched so float32 near-ties of the k-th are re-ranked in float64
_CHUNK_ELEMS = 1 << 24  # float64 elements per refinement chunk (128 MiB)
_REFINE_ELEMS = 1 << 21  # float64 elements per distance-refinement chunk (cache sized)
_APPROX_MAX_K = 4096  # widening cap of the approximate (HNSW) mode
_GPU_MAX_K = 2048  # largest k FAISS GPU indexes search
_FORMAT_VERSION = 2
"""Graph file version. 2 added `member_mask_N`; files of version 1 (built over every row,
held-out rows included) are rejected by `KnnGraph.load` so that callers rebuild them."""


def pair_dist(a_M_D: np.ndarray, b_M_D: np.ndarray) -> np.ndarray:
    """Euclidean distance in float64 along the last axis, the one formula every path uses.

    Args:
        a_M_D: First points (any float dtype; upcast to float64); leading axes broadcast.
        b_M_D: Second points, broadcastable against `a_M_D`.

    Returns:
        d_M: ``sqrt(sum((a - b) ** 2, axis=-1))``, float64. Symmetric bit for bit, and the
        same bits whatever the leading shape (contiguous last-axis pairwise summation).
    """
    diff = np.asarray(a_M_D, dtype=np.float64) - np.asarray(b_M_D, dtype=np.float64)
    diff = np.ascontiguousarray(diff)
    np.multiply(diff, diff, out=diff)
    return np.sqrt(diff.sum(axis=-1))


@dataclass(frozen=True, eq=False)
class KnnGraph:
    """kNN balls of every pool point (prompt-feature space), immutable once built.

    Attributes:
        k: Neighbours per ball.
        n_items: N (all rows, members or not).
        radius_N: float64 distance to the k-th nearest other member (NaN for non-members).
        ball_indptr: int64 [N + 1] CSR offsets of the ball members.
        ball_indices: int64 [E] members p != x with d(x, p) <= r_k(x), by distance.
        reverse_indptr: int64 [N + 1] CSR offsets of the reverse lists.
        reverse_indices: int64 [E] points x whose ball holds p, ascending.
        exact: True when the candidates came from an exact (flat) search.
        standardized: True when features were z-scored per dimension (over the members) first.
        member_mask_N: bool [N], the rows the graph was built over; None means every row.
            Non-members have empty balls and appear in no ball.
        ball_dist: float64 [E], d(x, p) of each ball entry (what `extend_knn_graph` re-ranks
            with); None in graphs saved before it was stored.
    """

    k: int
    n_items: int
    radius_N: np.ndarray
    ball_indptr: np.ndarray
    ball_indices: np.ndarray
    reverse_indptr: np.ndarray
    reverse_indices: np.ndarray
    exact: bool = True
    standardized: bool = False
    member_mask_N: np.ndarray | None = None
    ball_dist: np.ndarray | None = None

    @property
    def n_entries(self) -> int:
        """E, the total number of ball memberships."""
        return int(self.ball_indices.shape[0])

    @property
    def n_members(self) -> int:
        """Rows the graph was built over (N when `member_mask_N` is None)."""
        return self.n_items if self.member_mask_N is None else int(np.count_nonzero(self.member_mask_N))

    def members(self) -> np.ndarray:
        """member_N: bool [N], True for the rows the graph was built over."""
        if self.member_mask_N is None:
            return np.ones(self.n_items, dtype=bool)
        return np.asarray(self.member_mask_N, dtype=bool)

    def ball(self, row: int) -> np.ndarray:
        """Members of the ball of `row`."""
        return self.ball_indices[self.ball_indptr[row] : self.ball_indptr[row + 1]]

    def reverse(self, row: int) -> np.ndarray:
        """Points whose ball holds `row`."""
        return self.reverse_indices[self.reverse_indptr[row] : self.reverse_indptr[row + 1]]

    def counts_inside(self, acquired_mask_N: np.ndarray) -> np.ndarray:
        """n(x): acquired points inside the ball of each x (x itself never counts).

        Args:
            acquired_mask_N: bool, True for acquired points.

        Returns:
            n_N: int64 counts.
        """
        rows_E = np.repeat(np.arange(self.n_items, dtype=np.int64), np.diff(self.ball_indptr))
        hit_E = np.asarray(acquired_mask_N, dtype=bool)[self.ball_indices]
        return np.bincount(rows_E[hit_E], minlength=self.n_items).astype(np.int64)

    def save(self, path: pathlib.Path) -> None:
        """Write the graph to an ``.npz`` file (no pickles), `member_mask_N` included."""
        extra: dict[str, Any] = {}
        if self.member_mask_N is not None:
            extra["member_mask_N"] = np.asarray(self.member_mask_N, dtype=bool)
        if self.ball_dist is not None:
            extra["ball_dist"] = np.asarray(self.ball_dist, dtype=np.float64)
        np.savez(
            pathlib.Path(path),
            format_version=np.int64(_FORMAT_VERSION),
            k=np.int64(self.k),
            n_items=np.int64(self.n_items),
            radius_N=self.radius_N,
            ball_indptr=self.ball_indptr,
            ball_indices=self.ball_indices,
            reverse_indptr=self.reverse_indptr,
            reverse_indices=self.reverse_indices,
            exact=np.bool_(self.exact),
            standardized=np.bool_(self.standardized),
            **extra,
        )

    @classmethod
    def load(cls, path: pathlib.Path) -> KnnGraph:
        """Read a graph written by `save`.

        Files of an older format version (1: no member mask, held-out rows were ball
        members) are rejected, not read as "all members", so the caller rebuilds them.

        Raises:
            FailedPrecondition: The file is not a graph of this format version (reason
                GRAPH_FORMAT).
        """
        with np.load(pathlib.Path(path), allow_pickle=False) as z:
            version = int(z["format_version"]) if "format_version" in z else -1
            if version != _FORMAT_VERSION:
                raise FailedPrecondition(
                    f"kNN graph file {path} has format version {version}, "
                    f"expected {_FORMAT_VERSION}",
                    field="graph",
                    reason="GRAPH_FORMAT",
                )
            n_items = int(z["n_items"])
            member_mask_N = np.asarray(z["member_mask_N"], dtype=bool) if "member_mask_N" in z else None
            if member_mask_N is not None and member_mask_N.shape != (n_items,):
                raise FailedPrecondition(
                    f"kNN graph file {path} has a member mask of shape {member_mask_N.shape}, "
                    f"expected ({n_items},)",
                    field="graph",
                    reason="GRAPH_FORMAT",
                )
            return cls(
                k=int(z["k"]),
                n_items=n_items,
                radius_N=np.asarray(z["radius_N"], dtype=np.float64),
                ball_indptr=np.asarray(z["ball_indptr"], dtype=np.int64),
                ball_indices=np.asarray(z["ball_indices"], dtype=np.int64),
                reverse_indptr=np.asarray(z["reverse_indptr"], dtype=np.int64),
                reverse_indices=np.asarray(z["reverse_indices"], dtype=np.int64),
                exact=bool(z["exact"]),
                standardized=bool(z["standardized"]),
                member_mask_N=member_mask_N,
                ball_dist=np.asarray(z["ball_dist"], dtype=np.float64) if "ball_dist" in z else None,
            )


def feature_moments(feats_N_D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation (float64, std 0 replaced by 1)."""
    n, d = feats_N_D.shape
    s1 = np.zeros(d, dtype=np.float64)
    step = max(1, _CHUNK_ELEMS // max(d, 1))
    for lo in range(0, n, step):
        s1 += feats_N_D[lo : lo + step].astype(np.float64).sum(axis=0)
    mean = s1 / n
    s2 = np.zeros(d, dtype=np.float64)
    for lo in range(0, n, step):
        c = feats_N_D[lo : lo + step].astype(np.float64) - mean
        s2 += (c * c).sum(axis=0)
    std = np.sqrt(s2 / n)
    std[~(std > 0.0)] = 1.0
    return mean, std


class _Features:
    """float64 view of (optionally standardised) features, materialised per row subset."""

    def __init__(
        self,
        feats_N_D: np.ndarray,
        standardize: bool,
        moments: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.raw = feats_N_D
        self.moments = moments if moments is not None else (feature_moments(feats_N_D) if standardize else None)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        x = self.raw[idx].astype(np.float64)
        if self.moments is not None:
            x = (x - self.moments[0]) / self.moments[1]
        return x

    @property
    def streamed(self) -> bool:
        """Whether `float32` would copy raw float16 features: then the index is fed `float32_rows` chunks.

        A float16 pool (FEATURE_STORAGE_FLOAT16) keeps its arrays half-size so the FAISS
        index (which holds its own float32 copy) and the features fit memory at N = 1M;
        a whole float32 copy next to them would spend what float16 saved.
        """
        return self.raw.dtype == np.float16

    def float32_rows(self, idx: np.ndarray) -> np.ndarray:
        """float32 copy of rows `idx` (standardised when asked; float16 -> float32 is exact)."""
        if self.moments is None:
            return np.ascontiguousarray(self.raw[idx], dtype=np.float32)
        return np.ascontiguousarray(self.rows(idx), dtype=np.float32)

    def float32(self) -> np.ndarray:
        n, d = self.raw.shape
        if self.moments is None:
            return np.ascontiguousarray(self.raw, dtype=np.float32)
        out = np.empty((n, d), dtype=np.float32)
        step = max(1, _CHUNK_ELEMS // max(d, 1))
        for lo in range(0, n, step):
            out[lo : lo + step] = self.rows(np.arange(lo, min(n, lo + step)))
        return out


_ADD_ROWS_ELEMS = 1 << 24  # float32 entries per chunk added to a FAISS index from float16 features (64 MiB)


def _make_index(x32_N_D: np.ndarray | _Features, exact: bool, use_gpu: bool) -> tuple[Any, Any]:
    """FAISS index holding `x32_N_D`, and the GPU resources it needs alive (or None).

    `x32_N_D` is a float32 array, or `_Features` whose float32 rows are added chunk by
    chunk (float16 features: no whole float32 copy next to the index's own).
    """
    import faiss

    n, d = x32_N_D.raw.shape if isinstance(x32_N_D, _Features) else x32_N_D.shape
    index: Any
    if exact:
        index = faiss.IndexFlatL2(d)
    elif use_gpu:
        nlist = int(max(16, min(65536, 4 * np.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), nlist, faiss.METRIC_L2)
    else:
        index = faiss.IndexHNSWFlat(d, 32)
        index.hnsw.efConstruction = 80
    res = None
    if use_gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    if not exact and use_gpu:
        sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, 64 * 4096), replace=False))
        index.train(x32_N_D.float32_rows(sample) if isinstance(x32_N_D, _Features) else x32_N_D[sample])
        index.nprobe = 32
    if isinstance(x32_N_D, _Features):
        step = max(1, _ADD_ROWS_ELEMS // max(1, d))
        for lo in range(0, n, step):
            index.add(x32_N_D.float32_rows(np.arange(lo, min(n, lo + step))))
    else:
        index.add(x32_N_D)
    return index, res


def _search(index: Any, x32_R_D: np.ndarray, kk: int, exact: bool) -> np.ndarray:
    if not exact:
        import faiss

        inner: Any = faiss.downcast_index(index) if hasattr(faiss, "downcast_index") else index
        if hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = max(2 * kk, 64)
    _, ids = index.search(x32_R_D, kk)
    return np.asarray(ids, dtype=np.int64)


def _refine(
    feats: _Features, rows_R: np.ndarray, ids_R_K: np.ndarray, k: int
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], np.ndarray]:
    """float64 radii and closed-ball members of `rows_R` from candidate ids.

    Returns:
        radius_R, members (list of R arrays sorted by distance then id), their distances,
        saturated_R (True when every retrieved candidate is inside the ball).
    """
    r, kk = ids_R_K.shape
    radius_R = np.empty(r, dtype=np.float64)
    members: list[np.ndarray] = []
    dists: list[np.ndarray] = []
    saturated_R = np.zeros(r, dtype=bool)
    step = max(1, _REFINE_ELEMS // max(1, kk * feats.raw.shape[1]))
    for lo in range(0, r, step):
        hi = min(r, lo + step)
        ids = ids_R_K[lo:hi]
        rows = rows_R[lo:hi]
        a = feats.rows(rows)
        safe = np.where(ids >= 0, ids, rows[:, None])
        d = pair_dist(a[:, None, :], feats.rows(safe.ravel()).reshape(hi - lo, kk, -1))
        bad = (ids < 0) | (ids == rows[:, None])
        d[bad] = np.inf
        order = np.lexsort((ids, d), axis=1)
        d_sorted = np.take_along_axis(d, order, axis=1)
        id_sorted = np.take_along_axis(ids, order, axis=1)
        rad = d_sorted[:, k - 1] if k > 0 else np.zeros(hi - lo)  # k = 0: duplicates only
        radius_R[lo:hi] = rad
        inside = d_sorted <= rad[:, None]
        n_valid = np.isfinite(d_sorted).sum(axis=1)
        n_in = inside.sum(axis=1)
        saturated_R[lo:hi] = n_in >= n_valid
        for i in range(hi - lo):
            members.append(id_sorted[i, : n_in[i]].copy())
            dists.append(d_sorted[i, : n_in[i]].copy())
    return radius_R, members, dists, saturated_R


def build_knn_graph(
    prompt_feats_N_D: np.ndarray,
    k: int,
    *,
    standardize: bool = False,
    exact_threshold: int = 200_000,
    use_gpu: bool | None = None,
    member_mask_N: np.ndarray | None = None,
) -> KnnGraph:
    """Build the kNN balls of a pool once (FAISS candidates, float64 radii).

    Exact ``IndexFlatL2`` search up to `exact_threshold` members, HNSW above (IVF-Flat on
    GPU); GPU indexes are used when faiss reports GPUs (or `use_gpu` forces it).

    Args:
        prompt_feats_N_D: Prompt features (float16, float32 or float64; distances are measured
            in float64 whatever the input, FAISS candidates in float32); the members' rows finite.
        k: Neighbours per ball (the KSG k of Melo et al. 2024), 1 <= k < number of members.
        standardize: z-score each feature dimension over the members first.
        exact_threshold: Largest number of members searched exactly.
        use_gpu: None = auto (faiss.get_num_gpus() > 0).
        member_mask_N: bool [N], the rows to build over (e.g. the SPLIT_POOL rows); None
            means every row. Rows keep their numbering in [0, N); a non-member gets an
            empty ball and radius NaN, appears in no ball and is ignored by the
            standardisation statistics. Over the members the result equals the graph of
            ``prompt_feats_N_D[member_mask_N]`` alone, re-indexed.

    Returns:
        The graph (`member_mask_N` stored as given, None when not given).

    Raises:
        InvalidArgument: Features not a finite 2-D array, k < 1, or a bad member mask.
        FailedPrecondition: No more than k members (reason POOL_TOO_SMALL).
    """
    feats_N_D = _checked_features(prompt_feats_N_D)
    k = int(k)
    if k < 1:
        raise InvalidArgument(f"k must be >= 1, got {k}", field="k")
    n = int(feats_N_D.shape[0])
    mask_N = None if member_mask_N is None else _checked_member_mask(member_mask_N, n)
    rows_M = None if mask_N is None or mask_N.all() else np.flatnonzero(mask_N).astype(np.int64)
    m = n if rows_M is None else int(rows_M.size)
    if m <= k:
        what = "items" if mask_N is None else "member (pool) items"
        raise FailedPrecondition(
            f"the kNN graph needs more than k={k} {what}; the pool has {m}",
            field="k",
            reason="POOL_TOO_SMALL",
        )
    feats_M_D = feats_N_D if rows_M is None else feats_N_D[rows_M]
    if feats_M_D.dtype.kind == "f" and not _all_finite(feats_M_D):
        raise InvalidArgument("prompt features contain NaN or inf", field="prompt_features")
    graph = _build(feats_M_D, k, standardize=standardize, exact=m <= exact_threshold, use_gpu=use_gpu)
    if mask_N is None:
        return graph
    if rows_M is not None:
        graph = _reindexed(graph, rows_M, n)
    return dataclasses.replace(graph, member_mask_N=mask_N.copy())


def build_authors_knn(
    prompt_feats_N_D: np.ndarray,
    k: int,
    candidate_mask_N: np.ndarray,
    acquired_mask_N: np.ndarray,
    *,
    standardize: bool = False,
    use_gpu: bool | None = None,
) -> tuple[KnnGraph, np.ndarray]:
    """Exact balls and counts of the BAL-PM authors' convention, for one acquisition call.

    The population is the candidate rows (the unlabelled, unleased pool of this call).
    r_k(x) is the k-th smallest distance from x to the population *with x itself
    included* (distance 0), i.e. the distance to its (k - 1)-th nearest other candidate
    (0 when k = 1); the ball of x is every candidate p != x with d(x, p) <= r_k(x); n(x)
    counts the acquired rows p != x (candidates or not) with d(x, p) <= r_k(x).
    Exact (flat) search with float64 re-ranking, as `build_knn_graph`.

    Args:
        prompt_feats_N_D: Prompt features; the candidate and acquired rows finite.
        k: The authors' k (1 <= k <= number of candidates).
        candidate_mask_N: bool [N], the population.
        acquired_mask_N: bool [N], rows counted in n(x).
        standardize: z-score each dimension with the candidates' mean and std first.
        use_gpu: None = auto.

    Returns:
        (graph, count_N): the graph over the candidates (``graph.k == k``, radius NaN
        outside them) and n(x) as int64 (0 outside the candidates).

    Raises:
        InvalidArgument: Bad features, k < 1 or bad masks.
        FailedPrecondition: Fewer than k candidates (field k, reason POOL_TOO_SMALL).
    """
    feats_N_D = _checked_features(prompt_feats_N_D)
    k = int(k)
    if k < 1:
        raise InvalidArgument(f"k must be >= 1, got {k}", field="k")
    n = int(feats_N_D.shape[0])
    cand_N = _checked_member_mask(candidate_mask_N, n, field="candidate_mask_N")
    acq_N = _checked_member_mask(acquired_mask_N, n, field="acquired_mask_N")
    rows_C = np.flatnonzero(cand_N).astype(np.int64)
    if rows_C.size < k:
        raise FailedPrecondition(
            f"the authors' kNN convention needs at least k={k} candidate items; there are {rows_C.size}",
            field="k",
            reason="POOL_TOO_SMALL",
        )
    rows_T = np.flatnonzero(acq_N & ~cand_N).astype(np.int64)  # acquired rows outside the population
    used_U = np.concatenate([rows_C, rows_T])
    if feats_N_D.dtype.kind == "f" and not _all_finite(feats_N_D[used_U]):
        raise InvalidArgument("prompt features contain NaN or inf", field="prompt_features")
    feats_C_D = feats_N_D[rows_C]
    moments = feature_moments(feats_C_D) if standardize else None
    sub = _build(feats_C_D, k - 1, standardize=standardize, exact=True, use_gpu=use_gpu, moments=moments)
    graph = dataclasses.replace(_reindexed(sub, rows_C, n), k=k, member_mask_N=cand_N.copy())
    count_N = graph.counts_inside(acq_N)
    if rows_T.size:
        count_N[rows_C] += _count_within(
            _Features(feats_C_D, standardize, moments),
            sub.radius_N,
            _Features(feats_N_D[rows_T], standardize, moments),
        )
    return graph, count_N


def _checked_features(prompt_feats_N_D: np.ndarray) -> np.ndarray:
    """The features as given (no copy): float16 rows stay float16 and are upcast where they are used
    (`_Features.rows` and `pair_dist` to float64, FAISS and `_Gemm` inputs to float32, exactly)."""
    feats_N_D = np.asarray(prompt_feats_N_D)
    if feats_N_D.ndim != 2 or feats_N_D.shape[1] < 1 or feats_N_D.dtype.kind not in "fiu":
        raise InvalidArgument(
            f"prompt features must be a numeric [N, D] array, got shape {feats_N_D.shape}",
            field="prompt_features",
        )
    return feats_N_D


def _checked_member_mask(mask: np.ndarray, n: int, field: str = "member_mask_N") -> np.ndarray:
    arr = np.asarray(mask)
    if arr.shape != (n,):
        raise InvalidArgument(f"{field} must have shape ({n},), got {arr.shape}", field=field)
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "iu" or not np.isin(arr, (0, 1)).all():
            raise InvalidArgument(f"{field} must be a boolean mask", field=field)
        arr = arr.astype(bool)
    return arr


def _reindexed(sub: KnnGraph, rows_M: np.ndarray, n: int) -> KnnGraph:
    """The graph `sub` of the rows `rows_M` (ascending) expressed in the row numbers of N rows."""
    radius_N = np.full(n, np.nan)
    radius_N[rows_M] = sub.radius_N
    ball_sizes_N = np.zeros(n, dtype=np.int64)
    ball_sizes_N[rows_M] = np.diff(sub.ball_indptr)
    rev_sizes_N = np.zeros(n, dtype=np.int64)
    rev_sizes_N[rows_M] = np.diff(sub.reverse_indptr)
    ball_indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(ball_sizes_N, out=ball_indptr[1:])
    reverse_indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(rev_sizes_N, out=reverse_indptr[1:])
    return KnnGraph(
        k=sub.k,
        n_items=n,
        radius_N=radius_N,
        ball_indptr=ball_indptr,
        ball_indices=rows_M[sub.ball_indices],  # monotone map: distance-then-id order is kept
        reverse_indptr=reverse_indptr,
        reverse_indices=rows_M[sub.reverse_indices],
        exact=sub.exact,
        standardized=sub.standardized,
        ball_dist=sub.ball_dist,
    )


def _count_within(queries: _Features, radius_Q: np.ndarray, targets: _Features) -> np.ndarray:
    """count_Q: targets t with d(q, t) <= radius_Q[q] (closed ball), exact flat search.

    Candidates come from a CPU ``IndexFlatL2`` (float32) and are re-measured in float64
    with `pair_dist`; a query is searched again with twice as many neighbours until at
    least ``_SLACK`` retrieved targets lie outside its ball or every target was retrieved.
    """
    q, t = queries.raw.shape[0], targets.raw.shape[0]
    count_Q = np.zeros(q, dtype=np.int64)
    if q == 0 or t == 0:
        return count_Q
    t32 = targets.float32()
    index, _ = _make_index(t32, exact=True, use_gpu=False)
    q32 = queries.float32()
    todo = np.arange(q, dtype=np.int64)
    kk = min(t, 1 + _SLACK)
    while todo.size:
        again: list[np.ndarray] = []
        step = max(1, _REFINE_ELEMS // max(1, kk * queries.raw.shape[1]))
        for lo in range(0, todo.size, step):
            rows = todo[lo : lo + step]
            ids = _search(index, q32[rows], kk, True)
            safe = np.where(ids >= 0, ids, 0)
            d = pair_dist(queries.rows(rows)[:, None, :], targets.rows(safe.ravel()).reshape(rows.size, kk, -1))
            valid = ids >= 0
            inside = valid & (d <= radius_Q[rows][:, None])
            count_Q[rows] = inside.sum(axis=1)
            outside = (valid & ~inside).sum(axis=1)
            if kk < t:
                again.append(rows[outside < _SLACK])
        todo = np.concatenate(again) if again else np.empty(0, dtype=np.int64)
        kk = min(t, 2 * kk)
    return count_Q


def _build(
    feats_N_D: np.ndarray,
    k: int,
    *,
    standardize: bool,
    exact: bool,
    use_gpu: bool | None,
    moments: tuple[np.ndarray, np.ndarray] | None = None,
) -> KnnGraph:
    """The graph of every row of `feats_N_D` (already validated); k = 0 means radius 0."""
    import faiss

    n = int(feats_N_D.shape[0])
    if use_gpu is None:
        use_gpu = bool(hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0)
    feats = _Features(feats_N_D, standardize, moments)
    x32 = None if feats.streamed else feats.float32()  # float16: rows converted chunk by chunk
    index, _gpu_resources = _make_index(feats if x32 is None else x32, exact, use_gpu)

    radius_N = np.empty(n, dtype=np.float64)
    empty = np.empty(0, np.int64)
    members: list[np.ndarray] = [empty] * n
    dists: list[np.ndarray] = [np.empty(0)] * n
    todo = np.arange(n, dtype=np.int64)
    kk = min(n, k + 1 + _SLACK)
    # Widening cap: exact CPU search can fetch every point; GPU search is limited to
    # 2048 neighbours and HNSW to _APPROX_MAX_K (balls of bigger tie groups are truncated).
    cap = n if exact else min(n, _APPROX_MAX_K)
    if use_gpu:
        cap = min(cap, _GPU_MAX_K)
    query_rows = 1 << 14
    while todo.size:
        again: list[np.ndarray] = []
        for lo in range(0, todo.size, query_rows):
            rows = todo[lo : lo + query_rows]
            ids = _search(index, feats.float32_rows(rows) if x32 is None else x32[rows], kk, exact)
            rad, mem, dist, sat = _refine(feats, rows, ids, k)
            radius_N[rows] = rad
            for i, row in enumerate(rows.tolist()):
                members[row] = mem[i]
                dists[row] = dist[i]
            if kk < cap:
                again.append(rows[sat])
        todo = np.concatenate(again) if again else np.empty(0, dtype=np.int64)
        if todo.size:
            kk = min(cap, 2 * kk)
            log.debug("widening %d tied kNN balls to %d candidates", todo.size, kk)

    return _assembled(k, n, radius_N, members, dists, None, exact=exact, standardized=standardize)


def _all_finite(x_N_D: np.ndarray) -> bool:
    step = max(1, _CHUNK_ELEMS // max(1, x_N_D.shape[1]))
    return all(bool(np.isfinite(x_N_D[lo : lo + step]).all()) for lo in range(0, len(x_N_D), step))


# ---- blocked-GEMM exact balls and the incremental graph -------------------------------------

_U32 = 2.0**-24  # unit roundoff of float32
_GEMM_BLOCK_ELEMS = 1 << 25  # float32 entries of one block of squared distances (128 MiB)


class _Gemm:
    """float32 copy of the member features for blocked-GEMM candidate search, with rounding bounds.

    A block of approximate squared distances is ``s(q, a) = |x_q|^2 + |x_a|^2 - 2 x_q . x_a``
    (one sgemm into a reused buffer, then two in-place additions; x the members' float32
    rows, no copy when they already are). `margins` bound how far s and the distances it
    implies can be from the float64 distances `pair_dist` measures, whatever the summation
    orders: the dot product is off by at most ``gamma (2 |x_q| |x_a|)`` and each float32
    squared norm by ``gamma |x|^2`` (gamma = 1.1 (D + 2) u / (1 - (D + 2) u), u = 2^-24, which
    also covers the two additions), and rounding float64 features to float32 moves a
    distance by at most ``u (|x_q| + |x_a|)``; the norms are inflated to upper bounds and
    |x_a| bounded by the largest. Candidates are re-measured in float64, so the bounds only
    decide which points are looked at, never the result.

    Args:
        feats_A_D: The member rows (float32 or float64), finite.
    """

    def __init__(self, feats_A_D: np.ndarray) -> None:
        a, d = feats_A_D.shape
        self.x_A_D = np.ascontiguousarray(feats_A_D, dtype=np.float32)
        self.sq_A = np.einsum("ad,ad->a", self.x_A_D, self.x_A_D)
        self.gamma = 1.1 * (d + 2) * _U32 / (1.0 - (d + 2) * _U32)
        self.norm_A = np.sqrt(self.sq_A.astype(np.float64) * (1.0 + self.gamma))  # upper bounds of |x_a|
        self.max_norm = float(self.norm_A.max()) if a else 0.0
        self.rows = max(1, min(4096, _GEMM_BLOCK_ELEMS // max(1, a)))
        # Two block buffers reused by every block: fresh ones would be page-faulted in each time.
        self._s_buf = np.empty((self.rows, a), dtype=np.float32)
        self._scratch = np.empty((min(self.rows, 32), a), dtype=np.float32)  # partitions 32 rows at a time

    def rows_per_block(self) -> int:
        """Query rows per block (one block of s holds at most `_GEMM_BLOCK_ELEMS` entries)."""
        return self.rows

    def sq_block(self, pos_R: np.ndarray) -> np.ndarray:
        """float32 [R, A] approximate squared distances of rows `pos_R` to every member.

        A view of a buffer the next call overwrites; R <= `rows_per_block()`.
        """
        s_R_A = self._s_buf[: pos_R.size]
        np.matmul(self.x_A_D[pos_R], self.x_A_D.T, out=s_R_A)
        s_R_A *= np.float32(-2.0)
        s_R_A += self.sq_A[None, :]
        s_R_A += self.sq_A[pos_R][:, None]
        return s_R_A

    def kth_smallest(self, s_R_A: np.ndarray, k: int) -> np.ndarray:
        """The k-th smallest entry of each row of a block (`s_R_A` unchanged)."""
        r = s_R_A.shape[0]
        out_R = np.empty(r, dtype=np.float32)
        step = self._scratch.shape[0]
        for lo in range(0, r, step):
            work = self._scratch[: min(step, r - lo)]
            np.copyto(work, s_R_A[lo : lo + step])
            work.partition(k - 1, axis=1)
            out_R[lo : lo + step] = work[:, k - 1]
        return out_R

    def margins(self, norm_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pad_R, err_R): distance padding for float64 features rounded to float32, error bound of s."""
        big = self.max_norm
        pad_R = 1.1 * _U32 * (norm_R + big)
        err_R = self.gamma * ((norm_R + big) ** 2 + norm_R**2 + big**2)
        return pad_R, err_R

    def threshold(self, radius_R: np.ndarray, norm_R: np.ndarray) -> np.ndarray:
        """float32 bound on s: every point within float64 distance `radius_R` has s <= it."""
        pad_R, err_R = self.margins(norm_R)
        bound_R = (radius_R * (1.0 + 1e-12) + pad_R) ** 2 + err_R
        return np.nextafter(bound_R.astype(np.float32), np.float32(np.inf))

    def radius_above(self, s_R: np.ndarray, norm_R: np.ndarray) -> np.ndarray:
        """float64 distances no smaller than the true distance of any point with s <= `s_R`."""
        pad_R, err_R = self.margins(norm_R)
        return np.sqrt(np.maximum(s_R.astype(np.float64), 0.0) + err_R) + pad_R


def _sorted_ball(ids_C: np.ndarray, d_C: np.ndarray, k: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(r_k, ball, distances) from every candidate within reach: members by (distance, id)."""
    order = np.lexsort((ids_C, d_C))
    d_sorted = d_C[order]
    radius = float(d_sorted[k - 1])
    inside = d_sorted <= radius
    return radius, ids_C[order][inside], d_sorted[inside]


def _gemm_balls(
    gemm: _Gemm, rows_at: Any, s_R_A: np.ndarray, pos_R: np.ndarray, k: int
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Exact closed balls of the rows `pos_R` (member positions) from their block of s.

    The k-th smallest s gives an upper bound r_hat on r_k (`_Gemm.radius_above`); every
    member whose s is within `_Gemm.threshold` of r_hat is then measured in float64, so
    the k-th smallest of those is r_k and the ball is every member within it (self
    excluded, duplicates included).

    Args:
        gemm: The members' GEMM copy.
        rows_at: position array -> float64 rows (the features `pair_dist` measures).
        s_R_A: `gemm.sq_block(pos_R)`; overwritten (self set to +inf).
        pos_R: Query positions.
        k: Neighbours per ball (1 <= k < A).

    Returns:
        radius_R, members (R arrays of positions, by distance then position), their distances.
    """
    r = s_R_A.shape[0]
    s_R_A[np.arange(r), pos_R] = np.inf
    norm_R = gemm.norm_A[pos_R]
    # k points have s <= the k-th smallest s, so r_k is at most the distance it implies.
    s_k_R = gemm.kth_smallest(s_R_A, k)
    reach_R = gemm.threshold(gemm.radius_above(s_k_R, norm_R), norm_R)
    z_R_D = rows_at(pos_R)
    qi_P, cand_P = np.nonzero(s_R_A <= reach_R[:, None])
    d_P = np.empty(qi_P.size, dtype=np.float64)
    step = max(1, _REFINE_ELEMS // max(1, z_R_D.shape[1]))
    for lo in range(0, qi_P.size, step):
        hi = min(qi_P.size, lo + step)
        d_P[lo:hi] = pair_dist(z_R_D[qi_P[lo:hi]], rows_at(cand_P[lo:hi]))
    bounds = np.searchsorted(qi_P, np.arange(r + 1))
    radius_R = np.empty(r, dtype=np.float64)
    members: list[np.ndarray] = []
    dists: list[np.ndarray] = []
    for i in range(r):
        seg = slice(bounds[i], bounds[i + 1])
        radius_R[i], ball, dist = _sorted_ball(cand_P[seg], d_P[seg], k)
        members.append(ball)
        dists.append(dist)
    return radius_R, members, dists


def _reverse_lists(ball_indptr: np.ndarray, ball_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR reverse lists of ball CSR lists: for each p, the rows x whose ball holds p, ascending."""
    n = int(ball_indptr.size - 1)
    rows_E = np.repeat(np.arange(n, dtype=np.int64), np.diff(ball_indptr))
    reverse_indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(ball_indices, minlength=n), out=reverse_indptr[1:])
    return reverse_indptr, rows_E[np.argsort(ball_indices, kind="stable")]


def _assembled(
    k: int,
    n: int,
    radius_N: np.ndarray,
    balls: list[np.ndarray],
    dists: list[np.ndarray],
    member_mask_N: np.ndarray | None,
    *,
    exact: bool = True,
    standardized: bool = False,
) -> KnnGraph:
    """A graph from per-row balls (row numbers by distance then row, empty for non-members) and their distances."""
    sizes_N = np.fromiter((b.size for b in balls), dtype=np.int64, count=n)
    ball_indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes_N, out=ball_indptr[1:])
    ball_indices = np.concatenate(balls).astype(np.int64) if n else np.empty(0, np.int64)
    reverse_indptr, reverse_indices = _reverse_lists(ball_indptr, ball_indices)
    return KnnGraph(
        k=k,
        n_items=n,
        radius_N=radius_N,
        ball_indptr=ball_indptr,
        ball_indices=ball_indices,
        reverse_indptr=reverse_indptr,
        reverse_indices=reverse_indices,
        exact=exact,
        standardized=standardized,
        member_mask_N=member_mask_N,
        ball_dist=np.concatenate(dists).astype(np.float64) if n else np.empty(0),
    )


def can_extend(graph: KnnGraph, n_items: int, member_mask_N: np.ndarray) -> bool:
    """Whether `extend_knn_graph` applies: an exact, unstandardised graph whose rows only gained members.

    Standardised graphs depend on the members' mean and std, which every append changes,
    and approximate graphs are not extended (both are rebuilt).
    """
    if not graph.exact or graph.standardized or n_items < graph.n_items:
        return False
    mask = np.asarray(member_mask_N, dtype=bool)
    return mask.shape == (n_items,) and np.array_equal(mask[: graph.n_items], graph.members())


def extend_knn_graph(graph: KnnGraph, prompt_feats_N_D: np.ndarray, member_mask_N: np.ndarray) -> KnnGraph:
    """The graph after appending rows: exactly what `build_knn_graph` gives on all of them.

    Appending M member rows to a graph of N0 members costs one blocked float32 GEMM of
    the M new rows against all N0 + M members (O((N0 + M) M D)) instead of a rebuild
    (O((N0 + M)^2 D)): the new rows get their balls from it (`_gemm_balls`), and an old
    row's ball changes only when a new row lies within its old radius; those rows are
    re-ranked in float64 over their old ball plus the new rows inside it (the k nearest
    of the grown pool are among them), every other row keeps its ball.

    Args:
        graph: An exact, unstandardised graph of the first `graph.n_items` rows (`can_extend`).
        prompt_feats_N_D: Prompt features of all N >= graph.n_items rows (the old rows unchanged).
        member_mask_N: bool [N]; on the old rows equal to `graph.members()`.

    Returns:
        The graph of all N rows (same k, `member_mask_N` stored).

    Raises:
        InvalidArgument: Bad features or mask, or a graph `can_extend` rejects (field graph).
    """
    feats_N_D = _checked_features(prompt_feats_N_D)
    n = int(feats_N_D.shape[0])
    mask_N = _checked_member_mask(member_mask_N, n)
    if not can_extend(graph, n, mask_N):
        raise InvalidArgument(
            "only an exact, unstandardised graph whose old rows keep their membership can be extended",
            field="graph",
            reason="GRAPH_NOT_EXTENSIBLE",
        )
    k, n0 = graph.k, graph.n_items
    rows_A = np.flatnonzero(mask_N).astype(np.int64)
    a = int(rows_A.size)
    a0 = int(np.searchsorted(rows_A, n0))  # positions [a0, a) are the new members
    old_dist_E = graph.ball_dist if graph.ball_dist is not None else _entry_distances(graph, feats_N_D)
    radius_N = np.full(n, np.nan)
    radius_N[:n0] = graph.radius_N
    balls: dict[int, np.ndarray] = {}  # the rows whose ball is new or changed, and their distances
    dists: dict[int, np.ndarray] = {}
    if a0 == a:
        return _replaced(graph, old_dist_E, n, radius_N, balls, dists, mask_N.copy())
    feats_A_D = feats_N_D if a == n else feats_N_D[rows_A]  # every row a member: no copy
    if feats_A_D.dtype.kind == "f" and not _all_finite(feats_A_D[a0:]):
        raise InvalidArgument("prompt features contain NaN or inf", field="prompt_features")

    def rows_at(pos: np.ndarray) -> np.ndarray:
        return np.asarray(feats_A_D[pos], dtype=np.float64)

    gemm = _Gemm(feats_A_D)
    old_radius_A0 = graph.radius_N[rows_A[:a0]]
    old_reach_A0 = gemm.threshold(old_radius_A0, gemm.norm_A[:a0])
    hit_old: list[np.ndarray] = []  # (old row, new row, float64 distance) of new rows inside old balls
    hit_new: list[np.ndarray] = []
    hit_d: list[np.ndarray] = []
    step = gemm.rows_per_block()
    for lo in range(a0, a, step):
        pos_R = np.arange(lo, min(a, lo + step), dtype=np.int64)
        s_R_A = gemm.sq_block(pos_R)
        # Old rows that may now hold a new row in their ball (checked before _gemm_balls edits s).
        qi_P, old_P = np.nonzero(s_R_A[:, :a0] <= old_reach_A0[None, :])
        rad_R, mem, dist = _gemm_balls(gemm, rows_at, s_R_A, pos_R, k)
        for i, row in enumerate(rows_A[pos_R].tolist()):
            radius_N[row] = rad_R[i]
            balls[row] = rows_A[mem[i]]
            dists[row] = dist[i]
        if qi_P.size:
            d_P = pair_dist(rows_at(old_P), rows_at(pos_R[qi_P]))
            inside_P = d_P <= old_radius_A0[old_P]
            hit_old.append(rows_A[old_P[inside_P]])
            hit_new.append(rows_A[pos_R[qi_P[inside_P]]])
            hit_d.append(d_P[inside_P])
    hit_rows = np.concatenate(hit_old) if hit_old else np.empty(0, np.int64)
    if hit_rows.size:
        # Re-rank every old row that a new row entered, over its old ball plus those new rows,
        # all rows at once: segment e of the entries below is the e-th such row.
        rows_X = np.unique(hit_rows)
        seg_of = np.full(n, -1, dtype=np.int64)
        seg_of[rows_X] = np.arange(rows_X.size)
        lo_X = graph.ball_indptr[rows_X]
        size_X = graph.ball_indptr[rows_X + 1] - lo_X
        old_seg = np.repeat(np.arange(rows_X.size), size_X)
        entry = np.arange(old_seg.size) - (np.cumsum(size_X) - size_X)[old_seg] + lo_X[old_seg]
        seg_C = np.concatenate([old_seg, seg_of[hit_rows]])
        ids_C = np.concatenate([graph.ball_indices[entry], *hit_new])
        d_C = np.concatenate([old_dist_E[entry], *hit_d])
        order = np.lexsort((ids_C, d_C, seg_C))  # by row, then distance, then id
        seg_C, ids_C, d_C = seg_C[order], ids_C[order], d_C[order]
        starts_X = np.searchsorted(seg_C, np.arange(rows_X.size))
        radius_X = d_C[starts_X + k - 1]
        keep_C = d_C <= radius_X[seg_C]
        cuts_X = np.cumsum(np.bincount(seg_C[keep_C], minlength=rows_X.size))[:-1]
        radius_N[rows_X] = radius_X
        for row, ball, dist_b in zip(
            rows_X.tolist(), np.split(ids_C[keep_C], cuts_X), np.split(d_C[keep_C], cuts_X), strict=True
        ):
            balls[row] = ball
            dists[row] = dist_b
    return _replaced(graph, old_dist_E, n, radius_N, balls, dists, mask_N.copy())


def _replaced(
    graph: KnnGraph,
    dist_E: np.ndarray,
    n: int,
    radius_N: np.ndarray,
    balls: dict[int, np.ndarray],
    dists: dict[int, np.ndarray],
    member_mask_N: np.ndarray,
) -> KnnGraph:
    """`graph` grown to n rows with the balls of the rows in `balls` replaced (rows >= n_items: new)."""
    n0 = graph.n_items
    changed = np.array(sorted(balls), dtype=np.int64)
    size_N = np.zeros(n, dtype=np.int64)
    size_N[:n0] = np.diff(graph.ball_indptr)
    size_C = np.fromiter((balls[r].size for r in changed.tolist()), dtype=np.int64, count=changed.size)
    size_N[changed] = size_C
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(size_N, out=indptr[1:])
    indices = np.empty(int(indptr[-1]), dtype=np.int64)
    dist = np.empty(int(indptr[-1]), dtype=np.float64)
    # Unchanged old rows: their entries move as a block to the rows' new offsets.
    row_E = np.repeat(np.arange(n0, dtype=np.int64), np.diff(graph.ball_indptr))
    is_changed_N = np.zeros(n, dtype=bool)
    is_changed_N[changed] = True
    keep_E = ~is_changed_N[row_E]
    to_E = np.arange(row_E.size) - graph.ball_indptr[row_E] + indptr[row_E]
    indices[to_E[keep_E]] = graph.ball_indices[keep_E]
    dist[to_E[keep_E]] = dist_E[keep_E]
    if changed.size:
        row_F = np.repeat(changed, size_C)
        to_F = np.arange(row_F.size) - (np.cumsum(size_C) - size_C)[np.repeat(np.arange(changed.size), size_C)]
        to_F += indptr[row_F]
        indices[to_F] = np.concatenate([balls[r] for r in changed.tolist()])
        dist[to_F] = np.concatenate([dists[r] for r in changed.tolist()])
    reverse_indptr, reverse_indices = _reverse_lists(indptr, indices)
    return KnnGraph(
        k=graph.k,
        n_items=n,
        radius_N=radius_N,
        ball_indptr=indptr,
        ball_indices=indices,
        reverse_indptr=reverse_indptr,
        reverse_indices=reverse_indices,
        exact=True,
        standardized=False,
        member_mask_N=member_mask_N,
        ball_dist=dist,
    )


def _entry_distances(graph: KnnGraph, feats_N_D: np.ndarray) -> np.ndarray:
    """float64 d(x, p) of every ball entry of a graph saved without `ball_dist`."""
    rows_E = np.repeat(np.arange(graph.n_items, dtype=np.int64), np.diff(graph.ball_indptr))
    out_E = np.empty(rows_E.size, dtype=np.float64)
    step = max(1, _REFINE_ELEMS // max(1, feats_N_D.shape[1]))
    for lo in range(0, rows_E.size, step):
        sl = slice(lo, lo + step)
        out_E[sl] = pair_dist(
            np.asarray(feats_N_D[rows_E[sl]], dtype=np.float64),
            np.asarray(feats_N_D[graph.ball_indices[sl]], dtype=np.float64),
        )
    return out_E

