"""Benchmark: appending rows to a pool's kNN graph, incremental extension vs a full rebuild.

Usage:
    python -m bench.knn_append [--sizes 10000,100000] [--dim 1024] [--k 13] [--append 0.01]
                               [--out bench/results/knn_append.json]

For each N: the exact graph of N rows (as the server holds it), then M = append x N new
rows arrive; side by side in one run, the full rebuild of all N + M rows (what the server
did before, `build_knn_graph`) and `extend_knn_graph` (one blocked GEMM of the M new rows
against all N + M). The two graphs are compared bit for bit. Synthetic clustered float32
prompt features as in bench/acquisition.py.

Also printed, so each row shows how far it is from the machine's limit: the flop count of
each path's distance search (2 (N + M)^2 D for the rebuild, 2 (N + M) M D for the
extension) and this machine's measured float32 GEMM rate (numpy sgemm, 4096 x 20000 x D).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from balpm_server.acquisition.knn import build_knn_graph, extend_knn_graph
from bench.acquisition import make_pool

FIELDS = ("radius_N", "ball_indptr", "ball_indices", "reverse_indptr", "reverse_indices")


def gemm_rate_gflops(d: int) -> float:
    """Best of 3 float32 GEMMs of 4096 x d by d x 20000, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4096, d)).astype(np.float32)
    b = rng.normal(size=(20000, d)).astype(np.float32)
    best = np.inf
    for _ in range(3):
        t = time.perf_counter()
        _ = a @ b.T
        best = min(best, time.perf_counter() - t)
    return 2 * 4096 * 20000 * d / best / 1e9


def run(n: int, d: int, k: int, append: float, seed: int) -> dict[str, Any]:
    m = max(1, round(n * append))
    feats, _ = make_pool(n + m, d, 2, seed)
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    mask = np.ones(n + m, dtype=bool)
    t = time.perf_counter()
    old = build_knn_graph(feats[:n], k, member_mask_N=mask[:n], exact_threshold=n + m)
    base_s = time.perf_counter() - t
    t = time.perf_counter()
    full = build_knn_graph(feats, k, member_mask_N=mask, exact_threshold=n + m)
    rebuild_s = time.perf_counter() - t
    t = time.perf_counter()
    ext = extend_knn_graph(old, feats, mask)
    extend_s = time.perf_counter() - t
    same = all(np.array_equal(getattr(full, f), getattr(ext, f), equal_nan=True) for f in FIELDS)
    return {
        "n": n, "m": m, "d": d, "k": k, "base_build_s": base_s, "rebuild_s": rebuild_s, "extend_s": extend_s,
        "ratio": rebuild_s / extend_s, "identical": same,
        "rebuild_gflop": 2 * (n + m) ** 2 * d / 1e9, "extend_gflop": 2 * (n + m) * m * d / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="pool sizes N before the append, comma-separated")
    p.add_argument("--dim", type=int, default=1024, help="feature dimension D")
    p.add_argument("--k", type=int, default=13, help="neighbours per ball (BAL-PM's k)")
    p.add_argument("--append", type=float, default=0.01, help="rows appended, as a fraction of N")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic features")
    p.add_argument("--out", default="", help="also write the rows as JSON here")
    args = p.parse_args()
    rate = gemm_rate_gflops(args.dim)
    rows = [run(int(s), args.dim, args.k, args.append, args.seed) for s in args.sizes.split(",")]
    print(f"{os.cpu_count()} CPU cores; float32 GEMM rate {rate:.1f} GFLOP/s (numpy sgemm)")
    print("        N |     M | rebuild N+M | extend  | ratio   | identical | rebuild at GEMM | extend at GEMM")
    for r in rows:
        print(f"{r['n']:>9} | {r['m']:>5} | {r['rebuild_s']:>9.2f} s | {r['extend_s']:>6.2f} s | "
              f"{r['ratio']:>6.1f}x | {'yes' if r['identical'] else 'NO':>9} | "
              f"{r['rebuild_gflop'] / rate:>13.1f} s | {r['extend_gflop'] / rate:>12.2f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"gemm_gflops": rate, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
