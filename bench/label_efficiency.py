"""Benchmark: does BAL-PM save labels? Simulated active learning through the service's own gRPC API.

Usage (the configuration of bench/results/README; `--quick` for a smoke run):

    python bench/label_efficiency.py \\
        --pool-file ../shared/data/preferences/hh_single_turn_train.jsonl.gz --pool-rows 0:1500 \\
        --test-file ../shared/data/preferences/hh_single_turn_test.jsonl.gz \\
        --oracles model,human --redundancy 4 --seeds 5 --rounds 10 --workers 2

What it does, per oracle (`human`: the file's own labels; `model`: a fixed random
reward MLP teacher over the same features, see `balpm.oracles`):

1. Starts a balpm server in this process (or uses `--server`), with its feature
   cache at `<data-dir>/feature_cache.sqlite3`, and computes the client-side
   features of every text through the server's own extractor and cache (the model
   oracle's teacher and its CLIENT-feature pools need them).
2. Tunes BAL-PM's beta and k on a validation split of the pool (the last
   `--val-fraction` of the pool rows, uploaded as held-out items; the test file is
   never used): BALPM runs over the grid with `--tune-seeds` seeds, scored by the
   mean validation log-likelihood over rounds 1..R.
3. Runs every strategy for every seed with the chosen (beta, k): round 0 is the same
   RANDOM batch per seed for all strategies, then `--rounds` batches of the strategy.
   Every round is a JSON line in `<out-dir>/label_efficiency_<oracle>.jsonl`.
4. Fits the posterior once on all pool labels (headroom) and writes plots (test LL
   and accuracy vs labels, mean +- standard error over seeds) and a markdown table:
   labels each strategy needs to reach RANDOM's final mean test LL (linear
   interpolation of the mean curve), the saving, and a paired bootstrap CI over seeds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from balpm.client import Client
from balpm.data import HiddenPair
from balpm.oracles import OracleData, PairFeatures, prepare_oracle
from balpm.simulate import SimulationConfig, load_split, parse_rows, run_simulation

STRATEGIES = ("RANDOM", "BALD", "POWER_BALD", "BALPM", "ENTROPY_ONLY")
COLORS = {
    "RANDOM": "tab:gray",
    "BALD": "tab:blue",
    "POWER_BALD": "tab:cyan",
    "BALPM": "tab:red",
    "ENTROPY_ONLY": "tab:green",
    "SOFTMAX_BALD": "tab:purple",
    "SOFTRANK_BALD": "tab:olive",
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ server


class InProcessServer:
    """A balpm server on a free loopback port, running in its own event-loop thread."""

    def __init__(self, data_dir: Path, *, device: str, model_path: str, pooling: str) -> None:
        from balpm_server.server import RunningServer, create_server
        from balpm_server.settings import Settings

        overrides: dict[str, Any] = {"pooling": pooling, "device": device}
        if model_path:
            overrides["model_path"] = model_path
        settings = Settings.from_env(
            environ={}, host="127.0.0.1", port=0, data_dir=str(data_dir), metrics_port=-1, log_json=False
        )
        settings = dataclasses.replace(
            settings, max_training_jobs_per_tenant=64, max_pools_per_tenant=1000, **overrides
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningServer = asyncio.run_coroutine_threadsafe(create_server(settings), self.loop).result(120)
        self.target = f"127.0.0.1:{self.running.port}"
        self.settings = settings

    def stop(self) -> None:
        """Stop the server and its loop."""
        asyncio.run_coroutine_threadsafe(self.running.stop(0.5), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# ------------------------------------------------------------------------------------ runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One simulated run."""

    oracle: str
    strategy: str
    seed: int
    phase: str  # "tune" or "main"
    beta: float
    knn_k: int


def extract_features(
    pairs: Sequence[HiddenPair],
    *,
    cache_path: Path,
    model_path: str = "",
    pooling: str = "mean",
    device: str = "auto",
    max_length_tokens: int = 256,
    batch_size: int = 64,
) -> tuple[PairFeatures, dict[str, int]]:
    """Features of the items with the server's embedded extractor behind its disk cache, in this process.

    The texts are those the server embeds for a SERVER-feature pool (prompt, prompt + completion A,
    prompt + completion B) and the cache key is the server's, so a warm cache answers without running
    the model. (The `balpm` client package no longer imports the server: `balpm.oracles.extract_features`
    asks a running server instead, through ExportItems.)

    Returns:
        (features, {"hits": cached texts, "misses": texts embedded now}).
    """
    from balpm_server.features.cache import CachedExtractor
    from balpm_server.features.transformers_extractor import TransformersExtractor
    from balpm_server.settings import default_model_path

    inner = TransformersExtractor(
        model_path or default_model_path(),
        pooling=pooling,
        max_length_tokens=max_length_tokens,
        batch_size=batch_size,
        device=device,
    )
    ex = CachedExtractor(inner, Path(cache_path))
    prompts = [p.item["prompt"] for p in pairs]
    texts_a = [p.item["prompt"] + p.item["completion_a"] for p in pairs]
    texts_b = [p.item["prompt"] + p.item["completion_b"] for p in pairs]

    async def run() -> np.ndarray:
        try:
            return await ex.embed(prompts + texts_a + texts_b)
        finally:
            await ex.close()

    feats = asyncio.run(run())
    n = len(pairs)
    return PairFeatures(feats[:n], feats[n : 2 * n], feats[2 * n :]), {"hits": ex.hits, "misses": ex.misses}


def _features_for(pairs: Sequence[HiddenPair], args: argparse.Namespace) -> PairFeatures:
    t0 = time.perf_counter()
    feats, stats = extract_features(
        pairs,
        cache_path=Path(args.feature_cache) if args.feature_cache else Path(args.data_dir) / "feature_cache.sqlite3",
        model_path=args.model_path,
        pooling=args.pooling,
        device=args.device,
    )
    _log(f"features of {len(pairs)} items: {stats['hits']} cached, {stats['misses']} embedded, "
         f"{time.perf_counter() - t0:.1f} s")
    return feats


def _oracle_data(
    oracle: str,
    pool: list[HiddenPair],
    test: list[HiddenPair],
    feats: tuple[PairFeatures, PairFeatures] | None,
    args: argparse.Namespace,
    label_seed: int,
) -> OracleData:
    return prepare_oracle(
        pool,
        test,
        oracle,
        agreement=args.oracle_agreement,
        redundancy=args.redundancy if oracle == "model" else 1,
        noise=args.redundancy_noise,
        teacher_seed=args.teacher_seed,
        label_seed=label_seed,
        features=feats,
    )


def _pool_settings(args: argparse.Namespace, data: OracleData, knn_k: int) -> dict[str, Any]:
    s: dict[str, Any] = {
        "feature_source": data.feature_source,
        "ensemble_size": args.ensemble_size,
        "hidden_sizes": [int(h) for h in args.hidden_sizes.split(",")],
        "knn_k": knn_k,
        "standardize_features": args.standardize,
        # Strategy against strategy: every pick by the strategy under test (no random control arm).
        "control_fraction": 0.0,
    }
    if data.feature_source == "CLIENT":
        s["feature_dim"] = len(data.pool[0].item["prompt_features"])
    if args.epochs:
        s["epochs"] = args.epochs
    return s


def run_one(
    client: Client, spec: RunSpec, data: OracleData, args: argparse.Namespace, rounds: int
) -> list[dict[str, Any]]:
    """Run one simulation and return its round records, tagged with the spec."""
    config = SimulationConfig(
        strategy=spec.strategy,
        initial=args.initial,
        batch_size=args.batch_size,
        rounds=rounds,
        seed=spec.seed,
        epochs=args.epochs,
        feature_source=data.feature_source,
        pool_settings=tuple(_pool_settings(args, data, spec.knn_k).items()),
        acquire_options=(("beta", spec.beta),) + ((("d_ent", args.d_ent),) if args.d_ent is not None else ()),
        tags=(
            ("oracle", spec.oracle),
            ("phase", spec.phase),
            ("redundancy", data.info.get("redundancy", 1)),
            ("beta", spec.beta),
            ("knn_k", spec.knn_k),
            ("d_ent", args.d_ent if args.d_ent is not None else 1.0),
        ),
    )
    t0 = time.perf_counter()
    recs = run_simulation(client, data.pool, data.test, config)
    _log(f"{spec.phase} {spec.oracle} {spec.strategy} seed {spec.seed} beta {spec.beta} k {spec.knn_k}: "
         f"final LL {recs[-1]['test_log_likelihood']:.4f} acc {recs[-1]['test_accuracy']:.3f} "
         f"({time.perf_counter() - t0:.0f} s)")
    return recs


def _run_key(phase: str, strategy: str, seed: int, beta: float, knn_k: int) -> tuple[str, str, int, float, int]:
    """What identifies one run, for `--resume` (records carry the same fields)."""
    return (phase, strategy, int(seed), float(beta), int(knn_k))


def _completed_runs(path: Path) -> dict[tuple[str, str, int, float, int], list[dict[str, Any]]]:
    """Records of an earlier (interrupted) run grouped by spec, for `--resume`."""
    done: dict[tuple[str, str, int, float, int], list[dict[str, Any]]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                key = _run_key(r["phase"], r["strategy"], r["seed"], r["beta"], r["knn_k"])
                done.setdefault(key, []).append(r)
    return done


def run_many(
    target: str,
    specs: Sequence[RunSpec],
    data_for: Callable[[RunSpec], OracleData],
    args: argparse.Namespace,
    rounds: int,
    sink: Callable[[list[dict[str, Any]]], None],
    done: dict[tuple[str, str, int, float, int], list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Run specs with `args.workers` parallel clients against one server.

    Specs whose complete run (`rounds` + 1 records) is already in `done` (from
    `--resume`) are not run again; their records are returned with the new ones.
    """
    out: list[dict[str, Any]] = []
    lock = threading.Lock()
    todo = []
    for spec in specs:
        have = done.get(_run_key(spec.phase, spec.strategy, spec.seed, spec.beta, spec.knn_k), [])
        if len(have) == rounds + 1:
            out.extend(have)
        else:
            todo.append(spec)
    if len(todo) < len(specs):
        _log(f"resume: {len(specs) - len(todo)} of {len(specs)} runs already complete")

    def job(spec: RunSpec) -> None:
        with Client(target, timeout_s=600) as c:
            recs = run_one(c, spec, data_for(spec), args, rounds)
        with lock:
            out.extend(recs)
            sink(recs)

    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as ex:
        for f in [ex.submit(job, s) for s in todo]:
            f.result()
    return out


def full_pool_fit(client: Client, data: OracleData, args: argparse.Namespace, oracle: str) -> dict[str, Any]:
    """Headroom: train on every pool label once and evaluate on the test items."""
    pool_id = f"full-{oracle}-{os.getpid()}"
    client.create_pool(pool_id, **_pool_settings(args, data, 13))
    try:
        client.upload_items(pool_id, [p.item for p in data.pool] + [p.item for p in data.test])
        client.wait_pool_ready(pool_id)
        labels = [
            {"label_id": f"full-{p.item['item_id']}", "item_id": p.item["item_id"], "preference": p.preference}
            for p in data.pool
        ]
        for start in range(0, len(labels), 5000):
            client.ingest_labels(pool_id, labels[start : start + 5000])
        t0 = time.perf_counter()
        client.update_posterior(pool_id, seed=0, epochs=args.epochs)
        ev = client.evaluate(pool_id)
        return {
            "oracle": oracle,
            "labels": len(labels),
            "test_log_likelihood": ev.log_likelihood,
            "test_accuracy": ev.accuracy,
            "train_s": round(time.perf_counter() - t0, 1),
        }
    finally:
        client.delete_pool(pool_id)


# ------------------------------------------------------------------------------------ analysis


def curves(records: Iterable[dict[str, Any]], metric: str) -> dict[str, tuple[np.ndarray, dict[int, np.ndarray]]]:
    """strategy -> (labels_L, seed -> metric_L) from main-phase records."""
    by: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        by[r["strategy"]][r["seed"]][r["labels"]] = r[metric]
    out = {}
    for strat, seeds in by.items():
        labels = sorted(set.intersection(*(set(v) for v in seeds.values())))
        per_seed = {s: np.array([v[n] for n in labels]) for s, v in seeds.items()}
        out[strat] = (np.array(labels, dtype=np.float64), per_seed)
    return out


def labels_to_reach(labels_L: np.ndarray, curve_L: np.ndarray, target: float) -> float:
    """First label count where the (linearly interpolated) curve reaches `target`; inf if never."""
    for i in range(len(labels_L)):
        if curve_L[i] >= target:
            if i == 0:
                return float(labels_L[0])
            x0, x1, y0, y1 = labels_L[i - 1], labels_L[i], curve_L[i - 1], curve_L[i]
            return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0)) if y1 != y0 else float(x1)
    return math.inf


def savings_table(
    records: list[dict[str, Any]], n_boot: int = 2000, seed: int = 0, reference: str = "RANDOM"
) -> list[dict[str, Any]]:
    """Per strategy: labels to reach `reference`'s final mean test LL, saving and a paired bootstrap CI over seeds.

    The saving is 1 - needed / (the reference's final label count); a resample in which
    the strategy never reaches the target counts as -inf (so the CI shows "n/a").
    """
    cur = curves(records, "test_log_likelihood")
    if reference not in cur:
        return []
    labels_L, rand = cur[reference]
    seeds = sorted(set.intersection(*(set(c[1]) for c in cur.values())))
    n_final = float(labels_L[-1])
    rng = np.random.default_rng(seed)
    boots = [rng.choice(seeds, size=len(seeds), replace=True) for _ in range(n_boot)]
    rows = []
    for strat, (lab_L, per_seed) in cur.items():
        mat = np.stack([per_seed[s] for s in seeds])
        rmat = np.stack([rand[s] for s in seeds])
        target = float(rmat[:, -1].mean())
        need = labels_to_reach(lab_L, mat.mean(axis=0), target)
        sav = []
        for b in boots:
            idx = [seeds.index(s) for s in b]
            n_b = labels_to_reach(lab_L, mat[idx].mean(axis=0), float(rmat[idx, -1].mean()))
            sav.append(1.0 - n_b / n_final if math.isfinite(n_b) else -math.inf)
        lo, hi = np.percentile(np.array(sav), [2.5, 97.5], method="lower")
        final = mat[:, -1]
        rows.append(
            {
                "strategy": strat,
                "target_ll": target,
                "labels_needed": need,
                "saving": 1.0 - need / n_final if math.isfinite(need) else -math.inf,
                "ci_lo": float(lo),
                "ci_hi": float(hi),
                "final_ll": float(final.mean()),
                "final_ll_se": float(final.std(ddof=1) / math.sqrt(len(final))) if len(final) > 1 else 0.0,
                "n_seeds": len(seeds),
            }
        )
    order = {s: i for i, s in enumerate(STRATEGIES)}
    return sorted(rows, key=lambda r: order.get(r["strategy"], 99))


def batch_diagnostics(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per strategy, over rounds >= 1: mean distinct prompts per batch, epistemic and beta * entropy terms."""
    out: dict[str, dict[str, float]] = {}
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["round"] >= 1:
            by[r["strategy"]].append(r)
    for strat, rs in by.items():
        ent = [r["beta"] * r["mean_entropy"] for r in rs if r.get("mean_entropy") is not None]
        spread = [r["beta"] * (r["max_entropy"] - r["min_entropy"]) for r in rs if r.get("max_entropy") is not None]
        out[strat] = {
            "distinct_prompts": float(np.mean([r["distinct_prompts"] for r in rs])),
            "batch_size": float(np.mean([r["batch_size"] for r in rs])),
            "mean_epistemic": float(np.mean([r["mean_epistemic"] for r in rs])),
            "epistemic_range": float(np.mean([r["max_epistemic"] - r["min_epistemic"] for r in rs])),
            "beta_entropy": float(np.mean(ent)) if ent else math.nan,
            "beta_entropy_range": float(np.mean(spread)) if spread else math.nan,
        }
    return out


def per_round_terms(records: list[dict[str, Any]], strategy: str) -> list[dict[str, float]]:
    """Mean over seeds, per round, of BAL-PM's epistemic and beta * entropy components and distinct prompts."""
    by: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["strategy"] == strategy and r["round"] >= 1:
            by[r["round"]].append(r)
    rows = []
    for rnd in sorted(by):
        rs = by[rnd]
        ents = [r["beta"] * r["mean_entropy"] for r in rs if r.get("mean_entropy") is not None]
        rows.append(
            {
                "round": rnd,
                "labels": float(np.mean([r["labels"] for r in rs])),
                "mean_epistemic": float(np.mean([r["mean_epistemic"] for r in rs])),
                "epistemic_range": float(np.mean([r["max_epistemic"] - r["min_epistemic"] for r in rs])),
                "beta_entropy": float(np.mean(ents)) if ents else math.nan,
                "beta_entropy_range": float(
                    np.mean([r["beta"] * (r["max_entropy"] - r["min_entropy"]) for r in rs if r.get("max_entropy")
                             is not None])
                )
                if ents
                else math.nan,
                "distinct_prompts": float(np.mean([r["distinct_prompts"] for r in rs])),
            }
        )
    return rows


def plot(records: list[dict[str, Any]], title: str, path: Path) -> None:
    """Test LL and accuracy vs labels, mean +- standard error over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, name in ((axes[0], "test_log_likelihood", "test log-likelihood"), (axes[1], "test_accuracy",
                                                                                       "test accuracy")):
        for strat, (lab, per_seed) in sorted(curves(records, metric).items(), key=lambda kv: STRATEGIES.index(kv[0])
                                             if kv[0] in STRATEGIES else 99):
            mat = np.stack(list(per_seed.values()))
            m = mat.mean(axis=0)
            se = mat.std(axis=0, ddof=1) / math.sqrt(mat.shape[0]) if mat.shape[0] > 1 else np.zeros_like(m)
            ax.plot(lab, m, marker="o", ms=3, label=f"{strat} (n={mat.shape[0]})", color=COLORS.get(strat))
            ax.fill_between(lab, m - se, m + se, alpha=0.2, color=COLORS.get(strat))
        ax.set_xlabel("labels")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt_labels(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) else "not reached"


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else "n/a"


def write_markdown(
    path: Path,
    oracle: str,
    records: list[dict[str, Any]],
    tune: list[dict[str, Any]],
    chosen: tuple[float, int],
    info: dict[str, Any],
    headroom: dict[str, Any] | None,
    header: str,
) -> list[dict[str, Any]]:
    """The per-oracle markdown report; returns the savings table rows."""
    table = savings_table(records)
    diag = batch_diagnostics(records)
    max_labels = max(r["labels"] for r in records)
    lines = [f"# Label efficiency: {oracle} oracle", "", header, ""]
    lines += ["Oracle: `" + json.dumps(info) + "`", ""]
    if headroom:
        lines += [
            f"Headroom: all {headroom['labels']:,} pool labels reach test LL {headroom['test_log_likelihood']:.4f}, "
            f"accuracy {headroom['test_accuracy']:.3f} (chance -0.6931 / 0.5)."
            + (
                f" The teacher itself (Bayes) scores {info['test_bayes_log_likelihood']:.4f} / "
                f"{info['test_bayes_accuracy']:.3f} on these test draws."
                if "test_bayes_log_likelihood" in info
                else ""
            ),
            "",
        ]
    lines += [
        f"Labels each strategy needs to reach RANDOM's final mean test LL ({max_labels:,} labels); "
        "saving = 1 - needed / {:,}; 95% paired bootstrap CI over seeds (2,000 resamples; "
        "-inf = not reached in that resample). BAL-PM: beta = {}, k = {}.".format(max_labels, chosen[0], chosen[1]),
        "",
        "| strategy | labels needed | saving | 95% CI | final test LL (+- SE) | distinct prompts / batch | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table:
        d = diag.get(r["strategy"], {})
        lines.append(
            f"| {r['strategy']} | {_fmt_labels(r['labels_needed'])} | {_fmt_pct(r['saving'])} | "
            f"[{_fmt_pct(r['ci_lo'])}, {_fmt_pct(r['ci_hi'])}] | {r['final_ll']:.4f} +- {r['final_ll_se']:.4f} | "
            f"{d.get('distinct_prompts', math.nan):.1f} / {d.get('batch_size', math.nan):.0f} | {r['n_seeds']} |"
        )
    vs_bald = savings_table(records, reference="BALD")
    if vs_bald:
        lines += ["", f"The same against BALD's final mean test LL ({vs_bald[0]['target_ll']:.4f}):", "",
                  "| strategy | labels needed | saving vs BALD's budget | 95% CI |", "| --- | --- | --- | --- |"]
        for r in vs_bald:
            lines.append(f"| {r['strategy']} | {_fmt_labels(r['labels_needed'])} | {_fmt_pct(r['saving'])} | "
                         f"[{_fmt_pct(r['ci_lo'])}, {_fmt_pct(r['ci_hi'])}] |")
    lines += ["", "Batch composition and score terms (means over rounds >= 1 and seeds; `range` = max - min "
              "within a batch):", "",
              "| strategy | distinct prompts | epistemic (BALD) | epistemic range | beta x entropy | "
              "beta x entropy range |", "| --- | --- | --- | --- | --- | --- |"]
    for strat in [r["strategy"] for r in table]:
        d = diag[strat]
        lines.append(
            f"| {strat} | {d['distinct_prompts']:.1f} | {d['mean_epistemic']:.4f} | {d['epistemic_range']:.4f} | "
            f"{d['beta_entropy']:.4f} | {d['beta_entropy_range']:.4f} |"
        )
    terms = per_round_terms(records, "BALPM")
    if terms:
        lines += ["", "BAL-PM per round (means over seeds):", "",
                  "| round | labels | epistemic | epistemic range | beta x entropy | beta x entropy range | "
                  "distinct prompts |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for t in terms:
            lines.append(
                f"| {t['round']} | {t['labels']:.0f} | {t['mean_epistemic']:.4f} | {t['epistemic_range']:.4f} | "
                f"{t['beta_entropy']:.4f} | {t['beta_entropy_range']:.4f} | {t['distinct_prompts']:.1f} |"
            )
    if tune:
        lines += ["", "BAL-PM tuning on the validation split of the pool (never the test file); score = mean "
                  "validation LL over rounds >= 1, mean over tuning seeds:", "",
                  "| beta | k | validation score | final validation LL | distinct prompts / batch | runs |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for t in tune:
            mark = " **chosen**" if (t["beta"], t["knn_k"]) == chosen else ""
            lines.append(
                f"| {t['beta']} | {t['knn_k']} | {t['score']:.4f}{mark} | {t['final']:.4f} | "
                f"{t['distinct_prompts']:.1f} | {t['runs']} |"
            )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return table


def summarise_tuning(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (beta, k): mean over seeds of the mean validation LL over rounds >= 1."""
    by: dict[tuple[float, int], dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[(r["beta"], r["knn_k"])][r["seed"]].append(r)
    rows = []
    for (beta, k), seeds in by.items():
        per_seed = [np.mean([r["test_log_likelihood"] for r in rs if r["round"] >= 1]) for rs in seeds.values()]
        finals = [max(rs, key=lambda r: r["round"])["test_log_likelihood"] for rs in seeds.values()]
        dp = [r["distinct_prompts"] for rs in seeds.values() for r in rs if r["round"] >= 1]
        rows.append(
            {
                "beta": beta,
                "knn_k": k,
                "score": float(np.mean(per_seed)),
                "final": float(np.mean(finals)),
                "distinct_prompts": float(np.mean(dp)),
                "runs": len(seeds),
            }
        )
    return sorted(rows, key=lambda t: (t["beta"], t["knn_k"]))


# ------------------------------------------------------------------------------------ main


def machine() -> str:
    """One line describing this machine."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool-file", default="../shared/data/preferences/hh_single_turn_train.jsonl.gz")
    p.add_argument("--pool-rows", default="", help="row range START:STOP of the pool file")
    p.add_argument("--test-file", default="../shared/data/preferences/hh_single_turn_test.jsonl.gz")
    p.add_argument("--test-rows", default="", help="row range START:STOP of the test file")
    p.add_argument("--oracles", default="model,human")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    p.add_argument("--initial", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--ensemble-size", type=int, default=5)
    p.add_argument("--hidden-sizes", default="2048,256")
    p.add_argument("--epochs", type=int, default=0, help="max epochs per update (0 = server default)")
    p.add_argument("--standardize", action="store_true", help="pool setting standardize_features")
    p.add_argument("--oracle-agreement", type=float, default=0.89)
    p.add_argument("--redundancy", type=int, default=4, help="copies R of each pool item (model oracle)")
    p.add_argument("--redundancy-noise", type=float, default=0.01)
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--tune-betas", default="0,0.01,0.1,1")
    p.add_argument("--tune-ks", default="5,13")
    p.add_argument("--tune-seeds", type=int, default=2)
    p.add_argument("--tune-rounds", type=int, default=4)
    p.add_argument("--tune-oracles", default="model", help="oracles to tune on; the others use the first's choice")
    p.add_argument("--val-fraction", type=float, default=0.2, help="pool rows held out for tuning")
    p.add_argument("--beta", type=float, default=None, help="skip tuning: BAL-PM beta")
    p.add_argument("--knn-k", type=int, default=None, help="skip tuning: BAL-PM k")
    p.add_argument("--d-ent", type=float, default=None, help="BAL-PM d_ent of every AcquireBatch (default: pool's, 1)")
    p.add_argument("--workers", type=int, default=2, help="parallel runs against the one server")
    p.add_argument("--device", default="auto", help="server torch device (auto, cpu, cuda)")
    p.add_argument("--model-path", default="", help="local model folder for features (\"\" = bundled MiniLM)")
    p.add_argument("--pooling", default="mean", choices=["mean", "last_token"])
    p.add_argument(
        "--data-dir",
        default=".cache/hh-data",
        help="server data dir (feature cache inside); never share it with another running server",
    )
    p.add_argument(
        "--feature-cache",
        default="",
        help="client-side feature cache (default: the server's, <data-dir>/feature_cache.sqlite3, which the "
        "in-process server always uses for SERVER-feature pools such as the human oracle's)",
    )
    p.add_argument("--server", default="", help="use a running server instead (its data dir must match)")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the complete runs already in <out-dir>/label_efficiency_<oracle>.jsonl and run only the rest",
    )
    p.add_argument("--no-headroom", action="store_true", help="skip the all-pool-labels fit")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny pool, 2 seeds, 3 rounds")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="re-render plots and markdown from <out-dir>/label_efficiency_<oracle>.jsonl and the summary JSON",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.pool_rows = args.pool_rows or "0:300"
        args.test_rows = args.test_rows or "0:100"
        args.seeds, args.rounds, args.initial, args.batch_size = min(args.seeds, 2), 3, 32, 32
        args.hidden_sizes, args.ensemble_size = "64", 3
        args.tune_betas, args.tune_ks, args.tune_seeds, args.tune_rounds = "0,0.1", "13", 1, 2
        args.out_dir = args.out_dir + "/quick"
    return args


def report_only(args: argparse.Namespace) -> None:
    """Rebuild every oracle's PNG and markdown from the stored JSONL and summary (no runs)."""
    out_dir = Path(args.out_dir)
    summary = json.loads((out_dir / "label_efficiency_summary.json").read_text())
    for oracle, o in summary["oracles"].items():
        recs = [json.loads(line) for line in (out_dir / f"label_efficiency_{oracle}.jsonl").read_text().splitlines()]
        main_recs = [r for r in recs if r.get("phase", "main") == "main"]
        tune_rows = summarise_tuning([r for r in recs if r.get("phase") == "tune"])
        info = o["info"]
        red = f", redundancy R={info['redundancy']}" if oracle == "model" else ""
        n_seeds = len({r["seed"] for r in main_recs})
        png = out_dir / f"label_efficiency_{oracle}.png"
        plot(main_recs, f"{oracle} oracle{red}; {n_seeds} seeds, mean +- SE", png)
        md = out_dir / f"label_efficiency_{oracle}.md"
        if "header" not in summary and md.exists():  # older summaries: keep the header the run wrote
            text = md.read_text().split("\n\nOracle:")[0]
            summary["header"] = text.split("\n\n", 1)[1] if "\n\n" in text else text
        o["table"] = write_markdown(
            md,
            oracle,
            main_recs,
            tune_rows,
            (o["chosen_beta"], o["chosen_k"]),
            info,
            o["headroom"],
            summary.get("header", f"Command: `{summary['command']}`  \nMachine: {summary['machine']}"),
        )
    (out_dir / "label_efficiency_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark."""
    args = parse_args(argv)
    if args.report_only:
        report_only(args)
        return
    t_start = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python bench/label_efficiency.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    oracles = [o.strip() for o in args.oracles.split(",") if o.strip()]
    strategies = [s.strip().upper() for s in args.strategies.split(",") if s.strip()]
    if "RANDOM" not in strategies:
        strategies.insert(0, "RANDOM")
    seeds = list(range(args.seeds))

    pool_all = load_split(args.pool_file, 0, heldout=False, rows=parse_rows(args.pool_rows))
    test = load_split(args.test_file, 1, heldout=True, rows=parse_rows(args.test_rows))
    n_val = int(len(pool_all) * args.val_fraction)
    tune_pool = pool_all[: len(pool_all) - n_val]
    val = load_split(args.pool_file, 2, heldout=True, rows=parse_rows(args.pool_rows))[len(pool_all) - n_val :]
    _log(f"pool {len(pool_all)} rows (tuning: {len(tune_pool)} pool + {len(val)} validation), test {len(test)} rows")

    server = None
    if args.server:
        target = args.server
    else:
        server = InProcessServer(Path(args.data_dir), device=args.device, model_path=args.model_path,
                                 pooling=args.pooling)
        target = server.target
    try:
        feats: dict[str, PairFeatures] = {}
        if "model" in oracles:
            f_all = _features_for(pool_all + val + test, args)
            n_p, n_v = len(pool_all), len(val)
            feats["pool"], feats["val"] = f_all.take(range(n_p)), f_all.take(range(n_p, n_p + n_v))
            feats["test"] = f_all.take(range(n_p + n_v, len(f_all)))
            feats["tune_pool"] = feats["pool"].take(range(len(tune_pool)))
        cache: dict[tuple[str, str, int], OracleData] = {}
        cache_lock = threading.Lock()

        def data_for(spec: RunSpec) -> OracleData:
            key = (spec.oracle, spec.phase, spec.seed)
            with cache_lock:
                if key not in cache:
                    if spec.phase == "tune":
                        pair = (tune_pool, val, (feats["tune_pool"], feats["val"]) if spec.oracle == "model" else None)
                    else:
                        pair = (pool_all, test, (feats["pool"], feats["test"]) if spec.oracle == "model" else None)
                    cache[key] = _oracle_data(spec.oracle, pair[0], pair[1], pair[2], args, label_seed=spec.seed)
                return cache[key]

        header = (
            f"Command: `{command}`  \nMachine: {machine()}  \nScale: pool {args.pool_file} rows "
            f"{args.pool_rows or 'all'} ({len(pool_all)} items before redundancy), test {args.test_file} rows "
            f"{args.test_rows or 'all'} ({len(test)} items); initial {args.initial} RANDOM + {args.rounds} x "
            f"{args.batch_size}; seeds {len(seeds)}; ensemble {args.ensemble_size} x [{args.hidden_sizes}] tanh, "
            f"epochs {args.epochs or 'server default'}; features: {args.model_path or 'bundled all-MiniLM-L6-v2'} "
            f"({args.pooling} pooling)."
        )
        summary: dict[str, Any] = {"command": command, "machine": machine(), "header": header, "oracles": {}}
        chosen: tuple[float, int] | None = (
            (args.beta, args.knn_k) if args.beta is not None and args.knn_k is not None else None
        )
        for oracle in oracles:
            t_o = time.perf_counter()
            jsonl = out_dir / f"label_efficiency_{oracle}.jsonl"
            done = _completed_runs(jsonl) if args.resume else {}
            if done:
                # Keep only complete runs: a partial one is rerun from its start.
                n_rounds = {"tune": args.tune_rounds, "main": args.rounds}
                done = {k: v for k, v in done.items() if len(v) == n_rounds[k[0]] + 1}
                jsonl.write_text("".join(json.dumps(r) + "\n" for v in done.values() for r in v), encoding="utf-8")
            fh = open(jsonl, "a" if args.resume else "w", encoding="utf-8")  # noqa: SIM115

            def sink(recs: list[dict[str, Any]], fh: Any = fh) -> None:
                for r in recs:
                    fh.write(json.dumps(r) + "\n")
                fh.flush()

            tune_rows: list[dict[str, Any]] = []
            try:
                if args.beta is None and (chosen is None or oracle in args.tune_oracles.split(",")):
                    grid = [(float(b), int(k)) for b in args.tune_betas.split(",") for k in args.tune_ks.split(",")]
                    specs = [RunSpec(oracle, "BALPM", s, "tune", b, k) for s in range(args.tune_seeds)
                             for b, k in grid]
                    _log(f"{oracle}: tuning BAL-PM over {len(grid)} (beta, k) x {args.tune_seeds} seeds")
                    tune_recs = run_many(target, specs, data_for, args, args.tune_rounds, sink, done)
                    tune_rows = summarise_tuning(tune_recs)
                    best = max(tune_rows, key=lambda t: t["score"])
                    chosen = (best["beta"], best["knn_k"])
                    _log(f"{oracle}: chose beta {chosen[0]}, k {chosen[1]}")
                assert chosen is not None
                specs = [RunSpec(oracle, st, s, "main", chosen[0], chosen[1]) for s in seeds for st in strategies]
                main_recs = run_many(target, specs, data_for, args, args.rounds, sink, done)
            finally:
                fh.close()
            headroom = None
            if not args.no_headroom:
                with Client(target, timeout_s=600) as c:
                    headroom = full_pool_fit(c, data_for(RunSpec(oracle, "RANDOM", 0, "main", 0, 13)), args, oracle)
                _log(f"{oracle}: headroom {headroom}")
            info = data_for(RunSpec(oracle, "RANDOM", 0, "main", 0, 13)).info
            plot(main_recs, f"{oracle} oracle" + (f", redundancy R={info['redundancy']}" if oracle == "model" else "")
                 + f"; {len(seeds)} seeds, mean +- SE", out_dir / f"label_efficiency_{oracle}.png")
            table = write_markdown(out_dir / f"label_efficiency_{oracle}.md", oracle, main_recs, tune_rows, chosen,
                                   info, headroom, header)
            summary["oracles"][oracle] = {
                "chosen_beta": chosen[0],
                "chosen_k": chosen[1],
                "table": table,
                "headroom": headroom,
                "info": info,
                "minutes": round((time.perf_counter() - t_o) / 60, 1),
            }
            _log(f"{oracle}: done in {(time.perf_counter() - t_o) / 60:.1f} min")
        summary["minutes"] = round((time.perf_counter() - t_start) / 60, 1)
        (out_dir / "label_efficiency_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        _log(f"all done in {summary['minutes']} min; results in {out_dir}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
