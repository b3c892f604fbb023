"""Reference-style BAL-PM: dense float64 kNN radii and an O(B * N * D) greedy.

A direct port of the shape of the original BAL-PM code (Melo et al., NeurIPS 2024):
every pick recomputes its distance to all N pool points to update n(x). Kept as the
baseline of tests and `bench/acquisition.py`; the service uses `greedy_balpm`.

Distances use `pair_dist` (the same float64 formula as the kNN graph), so points lying
exactly on a ball boundary (e.g. the k-th neighbour itself) are counted identically.

`authors_reference` is a plain-loop transcription of the BAL-PM authors' convention
(`KnnConvention.AUTHORS`), the baseline of `greedy_balpm_authors`.

Letter legend: N pool items, D feature dim, B batch, R rows of a chunk.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import digamma

from balpm_server.acquisition.knn import feature_moments, pair_dist
from balpm_server.acquisition.params import CandidateBatch
from balpm_server.acquisition.strategies import AUTHORS_EPS, R_MIN, ksg_entropy_term

_CHUNK_ELEMS = 1 << 22


def _prepared(feats_N_D: np.ndarray, standardize: bool) -> np.ndarray:
    x = np.asarray(feats_N_D).astype(np.float64)
    if standardize:
        mean, std = feature_moments(feats_N_D)
        x = (x - mean) / std
    return x


def dense_knn_radius(feats_N_D: np.ndarray, k: int, *, standardize: bool = False) -> np.ndarray:
    """r_k of every point by dense float64 distances to all N points (O(N^2 D)).

    Candidates by the BLAS expansion |x|^2 + |y|^2 - 2 x.y, then the k + 9 nearest are
    re-measured with `pair_dist`; self is excluded by id.

    Returns:
        radius_N: float64.
    """
    x = _prepared(feats_N_D, standardize)
    n = x.shape[0]
    sq = (x * x).sum(axis=1)
    kk = min(n, k + 9)
    radius = np.empty(n, dtype=np.float64)
    step = max(1, _CHUNK_ELEMS // n)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        d2 = sq[lo:hi, None] + sq[None, :] - 2.0 * (x[lo:hi] @ x.T)
        d2[np.arange(hi - lo), np.arange(lo, hi)] = np.inf
        cand = np.argpartition(d2, kk - 2, axis=1)[:, : kk - 1] if kk - 1 < n else None
        if cand is None:
            cand = np.argsort(d2, axis=1)[:, : n - 1]
        m = cand.shape[1]
        dist = pair_dist(np.repeat(x[lo:hi], m, axis=0), x[cand.ravel()]).reshape(hi - lo, m)
        dist[cand == np.arange(lo, hi)[:, None]] = np.inf
        radius[lo:hi] = np.sort(dist, axis=1)[:, k - 1]
    return radius


def greedy_reference(
    feats_N_D: np.ndarray,
    radius_N: np.ndarray,
    *,
    batch_size: int,
    candidate_mask_N: np.ndarray,
    acquired_mask_N: np.ndarray,
    epistemic_N: np.ndarray | None,
    beta: float,
    d_ent: float,
    standardize: bool = False,
) -> CandidateBatch:
    """Reference greedy BAL-PM: each pick measures its distance to all N points.

    Returns:
        The batch (same contract as `greedy_balpm`).
    """
    x = _prepared(feats_N_D, standardize)
    n = x.shape[0]
    radius = np.asarray(radius_N, dtype=np.float64)
    count = np.zeros(n, dtype=np.int64)
    candidate = np.array(candidate_mask_N, dtype=bool, copy=True)
    acquired = np.array(acquired_mask_N, dtype=bool, copy=True)
    epi = np.zeros(n) if epistemic_N is None else np.asarray(epistemic_N, dtype=np.float64)
    sq = (x * x).sum(axis=1)
    margin = 1e-9 * (sq + sq.max()) + 1e-300

    def add(p: int) -> None:
        # Distance from the pick to all N points (BLAS expansion), then the points near
        # their ball boundary are re-measured with `pair_dist` so ties count exactly.
        d2 = sq + sq[p] - 2.0 * (x @ x[p])
        near = np.flatnonzero(d2 <= radius * radius + margin)
        near = near[near != p]
        inside = pair_dist(x[near], x[p]) <= radius[near]
        count[near[inside]] += 1

    for p in np.flatnonzero(acquired):
        add(int(p))
    idx_B = np.empty(batch_size, dtype=np.int64)
    tot_B = np.empty(batch_size)
    epi_B = np.empty(batch_size)
    ent_B = np.empty(batch_size)
    for t in range(batch_size):
        ent = ksg_entropy_term(np.maximum(radius, R_MIN), count, d_ent)
        tot = epi + beta * ent
        j = int(np.argmax(np.where(candidate, tot, -np.inf)))
        idx_B[t], tot_B[t], epi_B[t], ent_B[t] = j, tot[j], epi[j], ent[j]
        candidate[j] = False
        if not acquired[j]:
            acquired[j] = True
            add(j)
    return CandidateBatch(idx_B, tot_B, epi_B, ent_B)


def balpm_reference(
    feats_N_D: np.ndarray,
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
    """Dense float64 kNN radii followed by the O(B * N * D) reference greedy."""
    radius = dense_knn_radius(feats_N_D, k, standardize=standardize)
    return greedy_reference(
        feats_N_D,
        radius,
        batch_size=batch_size,
        candidate_mask_N=candidate_mask_N,
        acquired_mask_N=acquired_mask_N,
        epistemic_N=epistemic_N,
        beta=beta,
        d_ent=d_ent,
        standardize=standardize,
    )


def authors_reference(
    feats_N_D: np.ndarray,
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
    """Brute-force BAL-PM in the authors' convention (KnnConvention.AUTHORS), plain loops.

    Population: the candidate rows. r_k(x) = k-th smallest of {d(x, p) : p candidate},
    x itself included (distance 0). n(x) = #{p acquired, p != x, d(x, p) <= r_k(x)}.
    Greedy: pick the candidate with the largest
    BALD(x) + beta * (log(2 r_k(x) + 1e-4) - psi(n(x) + 1) / d_ent), lowest row on ties;
    it leaves the candidates and, if not acquired yet, joins the acquired rows (n of
    every remaining x with d(x, pick) <= r_k(x) grows by one); radii stay fixed.
    Distances are float64 ``sqrt(sum((a - b) ** 2))`` per pair (the bits of `pair_dist`);
    standardisation uses the candidates' mean and std (`feature_moments`).

    Returns:
        The batch (same contract as `greedy_balpm_authors`).
    """
    cand = [bool(c) for c in np.asarray(candidate_mask_N, dtype=bool)]
    acq = [bool(a) for a in np.asarray(acquired_mask_N, dtype=bool)]
    n = len(cand)
    x = np.asarray(feats_N_D).astype(np.float64)
    rows_C = [i for i in range(n) if cand[i]]
    if standardize:
        mean, std = feature_moments(np.asarray(feats_N_D)[rows_C])
        x = (x - mean) / std
    epi = [0.0] * n if epistemic_N is None else [float(e) for e in np.asarray(epistemic_N, dtype=np.float64)]

    def dist(i: int, j: int) -> float:
        diff = x[i] - x[j]
        return float(np.sqrt(np.sum(diff * diff)))

    radius = [math.nan] * n
    for i in rows_C:
        radius[i] = sorted(dist(i, j) for j in rows_C)[k - 1]
    count = [0] * n
    for i in rows_C:
        count[i] = sum(1 for p in range(n) if acq[p] and p != i and dist(i, p) <= radius[i])
    idx_B, tot_B, epi_B, ent_B = [], [], [], []
    for _ in range(batch_size):
        best: tuple[int, float, float] | None = None
        for i in range(n):
            if not cand[i]:
                continue
            ent = math.log(2.0 * radius[i] + AUTHORS_EPS) - float(digamma(count[i] + 1.0)) / d_ent
            tot = epi[i] + beta * ent
            if best is None or tot > best[1]:
                best = (i, tot, ent)
        assert best is not None
        j, tot, ent = best
        idx_B.append(j)
        tot_B.append(tot)
        epi_B.append(epi[j])
        ent_B.append(ent)
        cand[j] = False
        if not acq[j]:
            acq[j] = True
            for i in range(n):
                if cand[i] and i != j and dist(i, j) <= radius[i]:
                    count[i] += 1
    return CandidateBatch(
        np.asarray(idx_B, dtype=np.int64), np.asarray(tot_B), np.asarray(epi_B), np.asarray(ent_B)
    )
