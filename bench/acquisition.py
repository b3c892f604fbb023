"""Benchmark: incremental BAL-PM greedy vs the reference-style O(B * N * D) greedy.

Usage:
    python bench/acquisition.py [--sizes 10000,100000,1000000] [--dim 1024] [--k 13]
                                [--batch 320] [--ensemble 5]

Each size runs in its own subprocess (so peak RSS is per row) on synthetic clustered
float32 prompt features; epistemic scores come from an E-member random ensemble via
`bald_from_probs`; `--acquired` points start acquired (labelled / in flight).

Columns: index build (FAISS search + float64 refinement + CSR lists, ours), reference
dense float64 kNN, reference greedy (each pick measures its distance to all N points),
our greedy, ratio = reference greedy / our greedy, whether the picked ids are identical,
peak RSS. Above --ref-knn-max the dense reference kNN (N^2) is infeasible: the
reference greedy then runs on our graph's radii, so it times (and checks) only the
greedy part.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from balpm_server.acquisition import (
    AcquisitionParams,
    Strategy,
    bald_from_probs,
    build_knn_graph,
    select_batch,
)
from balpm_server.acquisition.reference import dense_knn_radius, greedy_reference


def make_pool(n: int, d: int, e: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered float32 features [N, D] and BALD scores [N] of a random E-member ensemble."""
    rng = np.random.default_rng(seed)
    n_clusters = max(8, int(np.sqrt(n) / 4))
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    feats = np.empty((n, d), dtype=np.float32)
    step = 1 << 14
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        c = rng.integers(0, n_clusters, hi - lo)
        feats[lo:hi] = centers[c] + 0.6 * rng.standard_normal((hi - lo, d), dtype=np.float32)
    w = rng.standard_normal((d, e)).astype(np.float32) / np.sqrt(d)
    logits = np.empty((n, e), dtype=np.float64)
    for lo in range(0, n, step):
        logits[lo : lo + step] = feats[lo : lo + step] @ w
    probs = 1.0 / (1.0 + np.exp(-logits))
    return feats, bald_from_probs(probs)


def run_one(args: argparse.Namespace, n: int) -> dict[str, object]:
    feats, epi = make_pool(n, args.dim, args.ensemble, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    acquired = np.zeros(n, dtype=bool)
    acquired[rng.choice(n, size=min(args.acquired, n // 2), replace=False)] = True
    candidate = ~acquired
    params = AcquisitionParams(k=args.k, beta=args.beta, d_ent=args.d_ent)

    t0 = time.perf_counter()
    graph = build_knn_graph(feats, args.k)
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ours = select_batch(
        Strategy.BALPM, batch_size=args.batch, candidate_mask_N=candidate,
        acquired_mask_N=acquired, rng=np.random.default_rng(0), params=params,
        epistemic_N=epi, graph=graph,
    )
    ours_s = time.perf_counter() - t0

    ref_knn_s: float | None = None
    if n <= args.ref_knn_max:
        t0 = time.perf_counter()
        radius = dense_knn_radius(feats, args.k)
        ref_knn_s = time.perf_counter() - t0
    else:
        radius = graph.radius_N
    t0 = time.perf_counter()
    ref = greedy_reference(
        feats, radius, batch_size=args.batch, candidate_mask_N=candidate,
        acquired_mask_N=acquired, epistemic_N=epi, beta=args.beta, d_ent=args.d_ent,
    )
    ref_s = time.perf_counter() - t0
    same = ours.indices_B.tolist() == ref.indices_B.tolist()
    return {
        "n": n,
        "build_s": build_s,
        "exact": graph.exact,
        "entries": graph.n_entries,
        "ref_knn_s": ref_knn_s,
        "ref_greedy_s": ref_s,
        "ours_s": ours_s,
        "same": same,
        "max_total_diff": float(np.max(np.abs(ours.total_B - ref.total_B))) if same else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k", type=int, default=13)
    p.add_argument("--batch", type=int, default=320)
    p.add_argument("--ensemble", type=int, default=5)
    p.add_argument("--acquired", type=int, default=64, help="points acquired before the batch")
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--d-ent", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-knn-max", type=int, default=20_000,
                   help="largest N for the dense float64 reference kNN")
    p.add_argument("--single", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        print(json.dumps(run_one(args, args.single)))
        return

    passthrough = [a for a in sys.argv[1:] if not a.startswith("--sizes")]
    if "--sizes" in sys.argv[1:]:
        i = sys.argv.index("--sizes")
        passthrough = sys.argv[1:i] + sys.argv[i + 2 :]
    print(f"BAL-PM greedy, D={args.dim} k={args.k} B={args.batch} E={args.ensemble} "
          f"acquired={args.acquired} float32 features, {_cpu_note()}")
    header = (f"{'N':>9} | {'build (ours)':>12} | {'ref kNN':>12} | {'ref greedy':>10} | "
              f"{'ours greedy':>11} | {'ratio':>9} | {'ids identical':>13} | {'peak RSS':>9}")
    print(header)
    print("-" * len(header))
    notes: list[str] = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        out = subprocess.run(
            [sys.executable, __file__, "--single", str(n), *passthrough],
            check=True, capture_output=True, text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ref_knn = f"{r['ref_knn_s']:.1f} s" if r["ref_knn_s"] is not None else "skipped*"
        if r["ref_knn_s"] is None:
            notes.append(f"* N={n}: dense N^2 float64 reference kNN skipped (N > --ref-knn-max="
                         f"{args.ref_knn_max}); reference greedy ran on our graph's radii, so "
                         "time and ids compare the greedy part only.")
        if not r["exact"]:
            notes.append(f"N={n}: graph built with HNSW (approximate kNN).")
        ratio = r["ref_greedy_s"] / r["ours_s"]
        print(f"{n:>9} | {r['build_s']:>10.1f} s | {ref_knn:>12} | {r['ref_greedy_s']:>8.1f} s | "
              f"{r['ours_s'] * 1e3:>8.1f} ms | {ratio:>8.1f}x | {'yes' if r['same'] else 'no':>13} | "
              f"{r['peak_rss_mb'] / 1024:>6.2f} GB")
    for note in notes:
        print(note)


def _cpu_note() -> str:
    import os

    return f"{os.cpu_count()} CPU cores"


if __name__ == "__main__":
    main()
