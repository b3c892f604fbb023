"""Benchmark: incremental BAL-PM greedy vs the reference-style O(B * N * D) greedy.

Usage:
    python bench/acquisition.py [--sizes 10000,100000,1000000] [--dim 1024] [--k 13]
                                [--batch 320] [--ensemble 5]
    python bench/acquisition.py --pool-storage float16 --sizes 1000000 [--repeats 7]
                                [--out bench/results/acquisition_1m.json]

Each size runs in its own subprocess (so peak RSS is per row) on synthetic clustered
float32 prompt features; epistemic scores come from an E-member random ensemble via
`bald_from_probs`; `--acquired` points start acquired (labelled / in flight).

Columns: index build (FAISS search + float64 refinement + CSR lists, ours), reference
dense float64 kNN, reference greedy (each pick measures its distance to all N points),
our greedy, ratio = reference greedy / our greedy, whether the picked ids are identical,
peak RSS. Above --ref-knn-max the dense reference kNN (N^2) is infeasible: the
reference greedy then runs on our graph's radii, so it times (and checks) only the
greedy part.

`--pool-storage float16|float32` measures a realistic pool instead (one row per size, no
reference): the pool's three feature arrays (prompt, A, B) held in that dtype as the server
holds a FEATURE_STORAGE_FLOAT16 / FLOAT32 pool, filled with Gaussian values chunk by chunk
(never a float64 copy of an array); the kNN graph built by the server's `build_knn_graph`
call (HNSW above `--exact-threshold`, the server's default 200,000; every row a member);
BALD scores of a random E-member ensemble on A - B, computed once (the server caches them
per posterior version); then `--repeats` timings of the fast greedy `greedy_balpm` for a
batch of `--batch` from n(x) counted once (AcquireBatch keeps it current). Reported:
build time, peak RSS of the process (ru_maxrss) after the arrays and after the build, the
greedy's p50 / min / max, and the memory arithmetic of the same pool in float32. Progress
lines go to stderr, so a run cut short by a time limit shows how far it got.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def _rss_gb() -> float:
    """Peak RSS of this process so far, in GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _log(t0: float, message: str) -> None:
    print(f"[{time.perf_counter() - t0:8.1f} s, peak RSS {_rss_gb():5.2f} GB] {message}", file=sys.stderr, flush=True)


def make_storage_pool(
    n: int, d: int, e: int, seed: int, dtype: type[np.floating]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The three feature arrays of an N-item pool in `dtype` (Gaussian, filled in chunks) and BALD scores.

    Each chunk is drawn as float32 and cast into the arrays: no float64 copy, no second copy
    of an array. The BALD scores come from a random E-member ensemble on (A - B), upcast to
    float32 per chunk, as the server's heads see a float16 pool's rows.
    """
    rng = np.random.default_rng(seed)
    feats = {kind: np.empty((n, d), dtype=dtype) for kind in ("prompt", "a", "b")}
    step = 1 << 14
    for arr in feats.values():
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            arr[lo:hi] = rng.standard_normal((hi - lo, d), dtype=np.float32)
    w = (rng.standard_normal((d, e), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    epi = np.empty(n, dtype=np.float64)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        diff = feats["a"][lo:hi].astype(np.float32) - feats["b"][lo:hi].astype(np.float32)
        probs = 1.0 / (1.0 + np.exp(-(diff @ w).astype(np.float64)))
        epi[lo:hi] = bald_from_probs(probs)
    return feats, epi


def run_pool(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """One realistic-pool row (`--pool-storage`); see the module doc."""
    import faiss

    from balpm_server.acquisition import greedy_balpm

    t0 = time.perf_counter()
    dtype = np.float16 if args.pool_storage == "float16" else np.float32
    d = args.dim
    _log(t0, f"N={n} D={d} {args.pool_storage} pool: generating the three feature arrays")
    feats, epi = make_storage_pool(n, d, args.ensemble, args.seed, dtype)
    gen_s = time.perf_counter() - t0
    rss_arrays = _rss_gb()
    _log(t0, f"arrays ready ({sum(a.nbytes for a in feats.values()) / 1e9:.2f} GB), BALD scores cached")

    rng = np.random.default_rng(args.seed + 1)
    acquired = np.zeros(n, dtype=bool)
    acquired[rng.choice(n, size=min(args.acquired, n // 2), replace=False)] = True
    candidate = ~acquired
    members = np.ones(n, dtype=bool)  # every row a SPLIT_POOL member, as the server passes pool_N

    # Progress of the two long phases, by wrapping the index builder and the query loop.
    from balpm_server.acquisition import knn as knn_mod

    real_make, real_search = knn_mod._make_index, knn_mod._search
    queried = {"rows": 0, "next": 0}

    def make_index(x32_N_D: Any, exact: bool, use_gpu: bool) -> tuple[Any, Any]:
        _log(t0, f"building the FAISS index ({'exact' if exact else 'HNSW'}, {faiss.omp_get_max_threads()} threads)")
        out = real_make(x32_N_D, exact, use_gpu)
        _log(t0, "index built; searching every row")
        return out

    def search(index: Any, x32_R_D: np.ndarray, kk: int, exact: bool) -> np.ndarray:
        ids = real_search(index, x32_R_D, kk, exact)
        queried["rows"] += len(x32_R_D)
        if queried["rows"] >= queried["next"]:
            _log(t0, f"searched {queried['rows']} rows (k'={kk})")
            queried["next"] += max(1, n // 10)
        return ids

    knn_mod._make_index, knn_mod._search = make_index, search
    try:
        t_build = time.perf_counter()
        graph = build_knn_graph(feats["prompt"], args.k, exact_threshold=args.exact_threshold, member_mask_N=members)
        build_s = time.perf_counter() - t_build
    finally:
        knn_mod._make_index, knn_mod._search = real_make, real_search
    rss_build = _rss_gb()
    _log(t0, f"graph built in {build_s:.1f} s ({graph.n_entries} ball entries, exact={graph.exact})")

    t_counts = time.perf_counter()
    count_N = graph.counts_inside(acquired)
    counts_s = time.perf_counter() - t_counts
    times: list[float] = []
    picks: list[list[int]] = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        batch = greedy_balpm(
            graph, batch_size=args.batch, candidate_mask_N=candidate, acquired_mask_N=acquired,
            epistemic_N=epi, beta=args.beta, d_ent=args.d_ent, count_N=count_N,
        )
        times.append(time.perf_counter() - t)
        picks.append(batch.indices_B.tolist())
    _log(t0, f"greedy x{args.repeats}: p50 {np.median(times) * 1e3:.1f} ms")
    per_array = n * d
    return {
        "n": n,
        "dim": d,
        "k": args.k,
        "batch": args.batch,
        "storage": args.pool_storage,
        "acquired": int(acquired.sum()),
        "cpu_cores": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "generate_s": gen_s,
        "build_s": build_s,
        "exact": graph.exact,
        "entries": graph.n_entries,
        "radius_median": float(np.nanmedian(graph.radius_N)),
        "counts_s": counts_s,
        "greedy_p50_ms": float(np.median(times) * 1e3),
        "greedy_min_ms": float(np.min(times) * 1e3),
        "greedy_max_ms": float(np.max(times) * 1e3),
        "greedy_repeats": args.repeats,
        "greedy_same_batch_every_time": all(p == picks[0] for p in picks),
        "peak_rss_after_arrays_gb": rss_arrays,
        "peak_rss_after_build_gb": rss_build,
        "peak_rss_gb": _rss_gb(),  # the whole run
        "feature_arrays_gb": sum(a.nbytes for a in feats.values()) / 1e9,
        "feature_arrays_float32_gb": 3 * per_array * 4 / 1e9,
        "feature_arrays_float16_gb": 3 * per_array * 2 / 1e9,
        "index_vectors_float32_gb": per_array * 4 / 1e9,
    }


def pool_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of `--pool-storage` rows.

    "Peak RSS in float32" adds the float32 arrays' extra bytes to the measured peak: the
    rest (the FAISS index's own float32 copy, the graph, the greedy) does not depend on the
    stored dtype.
    """
    out = [
        f"| N | D | storage | feature arrays | same arrays in float32 | kNN build | HNSW | peak RSS | "
        f"peak RSS in float32 (est.) | greedy p50 (B={rows[0]['batch'] if rows else 320}) |",
        "| ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        extra = r["feature_arrays_float32_gb"] - r["feature_arrays_gb"]
        out.append(
            f"| {r['n']} | {r['dim']} | {r['storage']} | {r['feature_arrays_gb']:.2f} GB | "
            f"{r['feature_arrays_float32_gb']:.2f} GB | {r['build_s']:.0f} s | "
            f"{'no (exact)' if r['exact'] else 'yes'} | {r['peak_rss_gb']:.2f} GB | "
            f"{r['peak_rss_gb'] + extra:.2f} GB | {r['greedy_p50_ms']:.1f} ms |"
        )
    return "\n".join(out)


def main_pool(args: argparse.Namespace, passthrough: list[str]) -> None:
    """`--pool-storage`: one subprocess per size (peak RSS per row), a table, `--out` JSON and .md."""
    print(f"Realistic pool: D={args.dim} k={args.k} B={args.batch} E={args.ensemble} acquired={args.acquired} "
          f"{args.pool_storage} feature arrays, {_cpu_note()}", flush=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        out = subprocess.run(
            [sys.executable, __file__, "--single", str(n), *passthrough],
            check=True, stdout=subprocess.PIPE, text=True,  # stderr (progress) passes through
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = pool_table(rows)
    print(table)
    if args.out:
        path = Path(args.out)
        path.write_text(json.dumps(rows, indent=2) + "\n")
        path.with_suffix(".md").write_text(table + "\n")


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
    p.add_argument("--pool-storage", choices=["float16", "float32"], default="",
                   help="measure a realistic pool whose three feature arrays are held in this dtype (see above)")
    p.add_argument("--exact-threshold", type=int, default=200_000,
                   help="--pool-storage: largest N built exactly (the server's knn_exact_threshold)")
    p.add_argument("--repeats", type=int, default=7, help="--pool-storage: greedy timings (p50 reported)")
    p.add_argument("--out", default="", help="--pool-storage: also write the rows as JSON here and the table as .md")
    p.add_argument("--single", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        print(json.dumps(run_pool(args, args.single) if args.pool_storage else run_one(args, args.single)))
        return

    passthrough = [a for a in sys.argv[1:] if not a.startswith("--sizes")]
    if "--sizes" in sys.argv[1:]:
        i = sys.argv.index("--sizes")
        passthrough = sys.argv[1:i] + sys.argv[i + 2 :]
    if args.pool_storage:
        main_pool(args, passthrough)
        return
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
