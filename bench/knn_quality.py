"""Benchmark: how far the approximate (HNSW) kNN graph is from the exact one, and what it does to BAL-PM.

Usage:
    python -m bench.knn_quality [--n 100000] [--dim 1024] [--k 13] [--batch 320] [--out FILE.json]

On one synthetic pool (clustered float32 features and BALD scores of a random ensemble, as
in bench/acquisition.py, `--acquired` rows pre-acquired) both graphs are built: exact (FAISS
flat search, what pools up to `knn_exact_threshold` get) and approximate (HNSW, above it).
Printed: build times and peak RSS; the share of rows whose approximate r_k is within 1%
(and 0.1%) of the exact one (HNSW can only miss neighbours, so its radii are >= exact); and
the overlap of the BAL-PM batch chosen on each graph (same scores, same state), the issue's
target being >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from balpm_server.acquisition import AcquisitionParams, Strategy, build_knn_graph, select_batch
from bench.acquisition import make_pool


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="pool size N")
    p.add_argument("--dim", type=int, default=1024, help="feature dimension D")
    p.add_argument("--k", type=int, default=13, help="neighbours per ball (BAL-PM's k)")
    p.add_argument("--batch", type=int, default=320, help="BAL-PM batch size B")
    p.add_argument("--ensemble", type=int, default=5, help="members of the random ensemble behind the BALD scores")
    p.add_argument("--acquired", type=int, default=64, help="rows acquired before the batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic pool")
    p.add_argument("--out", default="", help="also write the row as JSON here")
    args = p.parse_args()
    feats, epi = make_pool(args.n, args.dim, args.ensemble, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    acquired = np.zeros(args.n, dtype=bool)
    acquired[rng.choice(args.n, size=min(args.acquired, args.n // 2), replace=False)] = True
    params = AcquisitionParams(k=args.k)
    row: dict[str, object] = {"n": args.n, "dim": args.dim, "k": args.k, "batch": args.batch}
    batches = {}
    radii = {}
    for name, threshold in (("exact", args.n), ("approximate", 0)):
        t = time.perf_counter()
        graph = build_knn_graph(feats, args.k, exact_threshold=threshold)
        row[f"{name}_build_s"] = time.perf_counter() - t
        row[f"{name}_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        assert graph.exact == (name == "exact")
        radii[name] = graph.radius_N
        batches[name] = select_batch(
            Strategy.BALPM, batch_size=args.batch, candidate_mask_N=~acquired, acquired_mask_N=acquired,
            rng=np.random.default_rng(0), params=params, epistemic_N=epi, graph=graph,
        ).indices_B
        del graph
    rel = radii["approximate"] / np.maximum(radii["exact"], 1e-300) - 1.0
    row["radii_within_1pct"] = float(np.mean(np.abs(rel) <= 0.01))
    row["radii_within_0.1pct"] = float(np.mean(np.abs(rel) <= 0.001))
    row["radii_identical"] = float(np.mean(radii["approximate"] == radii["exact"]))
    row["batch_overlap"] = len(set(batches["exact"].tolist()) & set(batches["approximate"].tolist())) / args.batch
    print(json.dumps(row, indent=1))
    print(
        f"\n| N | D | exact build | HNSW build | radii within 1% | within 0.1% | identical | BAL-PM batch overlap "
        f"(B={args.batch}) |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        f"| {args.n} | {args.dim} | {row['exact_build_s']:.1f} s | {row['approximate_build_s']:.1f} s | "
        f"{row['radii_within_1pct']:.4f} | {row['radii_within_0.1pct']:.4f} | {row['radii_identical']:.4f} | "
        f"{row['batch_overlap']:.3f} |"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
