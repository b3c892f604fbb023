"""Benchmark: does the live savings estimate (GetLearningCurve) cover the true saving, and when does STOP land?

Usage (the configuration of bench/results/README; `--quick` for a smoke run):

    python bench/savings_coverage.py \\
        --pool-file ../shared/data/preferences/hh_single_turn_train.jsonl.gz --pool-rows 0:3000 \\
        --test-file ../shared/data/preferences/hh_single_turn_test.jsonl.gz --test-rows 0:1000 \\
        --teachers near_linear,reward --redundancy 1,4 --seeds 3 --workers 2

Per run (teacher x redundancy R x seed), two pools of the same items and teacher labels
in one server, both driven through gRPC round by round:

* active: BAL-PM with the random control arm (`control_fraction`, default 0.1): what a
  user runs in production; after every `--curve-every` rounds its GetLearningCurve is
  recorded (waiting for the background computation), as a user would read it.
* random: pure RANDOM without a control arm, the parallel runs (`--random-arms`, with their own
  seeds) whose mean test curve gives the truth.

The estimand of `SavingsEstimate` is 1 - n_active / n_r: n_r is the random-only
learner's label count (`random_label_count`), n_active the labels the active learner
needs to reach the random learner's log-likelihood at n_r. Its true value here: l* = the
random run's test log-likelihood at n_r (linear interpolation between rounds), n_active*
= the labels the active run needs to reach l* on the test items (the service's own
`labels_to_reach`), true share = 1 - n_active* / n_r. The estimate of the last round is
scored: covered when low <= true <= high.

STOP timing: the first label count at which the recommendation is STOP, against the label
count at which the active run's test log-likelihood first reaches 95% of its final gain
over round 0 (the curve continued to the end of the budget).

Writes `<out-dir>/savings_coverage.jsonl` (one line per round and arm, one summary line
per run) and `<out-dir>/savings_coverage.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from label_efficiency import InProcessServer, extract_features, machine

from balpm.client import Client
from balpm.data import HiddenPair
from balpm.oracles import OracleData, PairFeatures, model_oracle_data
from balpm.simulate import load_split, parse_rows
from balpm_server.posterior.savings import labels_to_reach

_print_lock = threading.Lock()


def _log(msg: str) -> None:
    with _print_lock:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: a teacher, a redundancy and a seed."""

    teacher: str
    redundancy: int
    seed: int

    @property
    def name(self) -> str:
        """Short name used in pool ids and tables."""
        return f"{self.teacher}-r{self.redundancy}-s{self.seed}"


def oracle_for(run: Run, pool: list[HiddenPair], test: list[HiddenPair], pool_f: PairFeatures,
               test_f: PairFeatures, args: argparse.Namespace) -> OracleData:
    """Items and teacher labels of a run: the pool's first rows, each repeated R times (same total size)."""
    base = len(pool) // run.redundancy
    return model_oracle_data(
        pool[:base], pool_f.take(range(base)), test, test_f, agreement=args.agreement, redundancy=run.redundancy,
        noise=args.redundancy_noise, teacher_seed=args.teacher_seed, label_seed=run.seed, teacher=run.teacher,
    )


def _settings(args: argparse.Namespace, dim: int, control_fraction: float) -> dict[str, Any]:
    return {
        "feature_source": "CLIENT", "feature_dim": dim, "ensemble_size": args.ensemble_size,
        "hidden_sizes": [int(h) for h in args.hidden.split(",")], "epochs": args.epochs,
        "control_fraction": control_fraction,
    }


def _curve_record(lc: Any) -> dict[str, Any]:
    sv, st = lc.savings, lc.stopping
    return {
        "estimable": sv.estimable, "reason": sv.reason, "share": sv.labels_saved_share,
        "low": sv.labels_saved_share_low, "high": sv.labels_saved_share_high,
        "random_labels": int(sv.random_label_count), "active_labels": sv.active_label_count,
        "compared_ll": sv.log_likelihood, "control_labels": int(lc.control_label_count),
        "slope_per_1k": st.slope_per_1k_labels, "slope_low": st.slope_low, "slope_high": st.slope_high,
        "recommendation": int(st.recommendation), "stop_reason": st.reason,
        "gain_estimable": lc.gain.estimable, "gain_reason": lc.gain.reason, "gain": lc.gain.gain,
        "gain_low": lc.gain.gain_low, "gain_high": lc.gain.gain_high, "gain_labels": int(lc.gain.label_count),
        "active_points": [(int(p.label_count), p.log_likelihood, int(p.eval_count)) for p in lc.active],
        "random_points": [(int(p.label_count), p.log_likelihood, int(p.eval_count)) for p in lc.random],
        "error": lc.error,
    }


def run_arm(client: Client, run: Run, arm: str, data: OracleData, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One arm of a run, round by round; one record per round."""
    active = arm == "active"
    pool_id = f"cov-{run.name}-{arm}"
    arm_seed = run.seed if active else run.seed * 100 + int(arm.removeprefix("random") or 0)
    dim = len(data.pool[0].item["prompt_features"])
    client.create_pool(pool_id, **_settings(args, dim, args.control_fraction if active else 0.0))
    by_id = {p.item["item_id"]: p for p in data.pool}
    records: list[dict[str, Any]] = []
    try:
        client.upload_items(pool_id, [p.item for p in data.pool] + [p.item for p in data.test])
        n_labels = 0
        for rnd in range(args.rounds + 1):
            size = args.initial if rnd == 0 else args.batch_size
            strategy = "RANDOM" if rnd == 0 or not active else args.strategy
            batch = client.acquire(pool_id, batch_size=size, strategy=strategy, seed=arm_seed * 1000 + rnd,
                                   annotator_id="oracle")
            client.ingest_labels(pool_id, [
                {"label_id": f"r{rnd}-{a.item.item_id}", "item_id": a.item.item_id,
                 "preference": by_id[a.item.item_id].preference, "annotator_id": "oracle"} for a in batch.items
            ])
            n_labels += len(batch.items)
            t0 = time.perf_counter()
            client.update_posterior(pool_id, seed=arm_seed * 1000 + rnd)
            train_s = time.perf_counter() - t0
            ev = client.evaluate(pool_id)
            rec: dict[str, Any] = {
                "kind": "round", "run": run.name, "teacher": run.teacher, "redundancy": run.redundancy,
                "seed": run.seed, "arm": arm, "round": rnd, "labels": n_labels,
                "control_in_batch": sum(a.control for a in batch.items),
                "test_log_likelihood": ev.log_likelihood, "test_accuracy": ev.accuracy, "train_s": round(train_s, 2),
            }
            if active and (rnd % args.curve_every == 0 or rnd == args.rounds) and rnd > 0:
                t1 = time.perf_counter()
                rec["curve"] = _curve_record(client.learning_curve(pool_id, wait=True, timeout_s=1800))
                rec["curve_s"] = round(time.perf_counter() - t1, 2)
            records.append(rec)
            _log(f"{run.name} {arm} round {rnd}: {n_labels} labels, test LL {ev.log_likelihood:.4f}"
                 + (f", saving {rec['curve']['share']:.3f} [{rec['curve']['low']:.3f}, {rec['curve']['high']:.3f}]"
                    if "curve" in rec and rec["curve"]["estimable"] else ""))
    finally:
        client.delete_pool(pool_id)
    return records


def _interp(labels_P: Sequence[float], values_P: Sequence[float], at: float) -> float:
    """Linear interpolation of a curve at a label count inside its range (NaN outside)."""
    if not len(labels_P) or at < labels_P[0] or at > labels_P[-1]:
        return float("nan")
    return float(np.interp(at, labels_P, values_P))


def summarise(run: Run, active: list[dict[str, Any]], randoms: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The run's final estimate against the truth from the parallel random runs (their mean curve); STOP timing."""
    curves = [r for r in active if "curve" in r]
    final: dict[str, Any] = curves[-1]["curve"] if curves else {"estimable": False, "reason": "no curve"}
    out: dict[str, Any] = {"kind": "run", "run": run.name, "teacher": run.teacher, "redundancy": run.redundancy,
                           "seed": run.seed, "estimate": final, "labels": active[-1]["labels"]}
    a_n = [float(r["labels"]) for r in active]
    a_ll = [float(r["test_log_likelihood"]) for r in active]
    # The truth averages over the random learner's own randomness (its draws and training), as the
    # service's cross-fitted random-only learner does.
    r_n = [float(r["labels"]) for r in randoms[0]]
    r_ll = [float(np.mean([arm[i]["test_log_likelihood"] for arm in randoms])) for i in range(len(r_n))]
    if final.get("estimable"):
        n_r = float(final["random_labels"])
        l_star = _interp(r_n, r_ll, n_r)
        n_active, why = labels_to_reach(a_n, a_ll, l_star) if np.isfinite(l_star) else (None, "n_r outside")
        out["true_ll_at_n_r"] = l_star
        if n_active is None:
            out["true_share"] = None
            out["true_reason"] = why
        else:
            true = 1.0 - n_active / n_r
            out["true_share"] = true
            out["covered"] = bool(float(final["low"]) <= true <= float(final["high"]))
            out["error"] = float(final["share"]) - true
    if final.get("gain_estimable"):
        n_g = float(final["gain_labels"])
        true_gain = _interp(a_n, a_ll, n_g) - _interp(r_n, r_ll, n_g)
        if np.isfinite(true_gain):
            out["true_gain"] = true_gain
            out["gain_covered"] = bool(float(final["gain_low"]) <= true_gain <= float(final["gain_high"]))
            out["gain_error"] = float(final["gain"]) - true_gain
    # STOP timing
    stops = [r["labels"] for r in curves if r["curve"]["recommendation"] == 3]
    out["stop_at"] = stops[0] if stops else None
    gain = a_ll[-1] - a_ll[0]
    reach = None
    if gain > 0:
        reach = next((n for n, ll in zip(a_n, a_ll, strict=True) if ll - a_ll[0] >= 0.95 * gain), None)
    out["gain95_at"] = reach
    if out["stop_at"] is not None and reach:
        out["stop_within_20pct"] = bool(abs(out["stop_at"] - reach) <= 0.2 * reach)
    return out


def _fmt(x: Any, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{100 * x:+.1f}%" if pct else f"{x}"


def write_markdown(summaries: list[dict[str, Any]], args: argparse.Namespace, path: Path, elapsed_s: float) -> None:
    """The coverage and STOP tables with the command and the machine."""
    lines = [
        "# Live savings estimate vs the true saving (bench/savings_coverage.py)",
        "",
        f"Command: `python bench/savings_coverage.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
        f"Machine: {machine()}; {elapsed_s / 60:.1f} min.",
        f"Per run: {args.initial} + {args.rounds} x {args.batch_size} labels; active = {args.strategy} with "
        f"control_fraction {args.control_fraction}, random = mean of {args.random_arms} RANDOM runs without control "
        f"arm; posterior "
        f"{args.ensemble_size} x [{args.hidden}], {args.epochs} epochs; model oracle (agreement {args.agreement}).",
        "",
        "| run | teacher | R | LL gain at n_r (95% interval) | true gain | covered | labels saved (95% interval) |"
        " true | covered | error | n_r | control labels | STOP at | 95% gain at |",
        "| --- | --- | ---: | --- | ---: | :---: | --- | ---: | :---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def yes(s: dict[str, Any], key: str) -> str:
        return "yes" if s.get(key) else ("no" if key in s else "-")

    for s in summaries:
        e = s["estimate"]
        est = (f"{_fmt(e['share'])} ({_fmt(e['low'])}, {_fmt(e['high'])})" if e.get("estimable")
               else f"not estimable ({e.get('reason', '')[15:70]}...)")
        gain = (f"{e['gain']:+.4f} ({e['gain_low']:+.4f}, {e['gain_high']:+.4f})" if e.get("gain_estimable")
                else "not estimable")
        true_gain = f"{s['true_gain']:+.4f}" if "true_gain" in s else "-"
        lines.append(
            f"| {s['run']} | {s['teacher']} | {s['redundancy']} | {gain} | {true_gain} | {yes(s, 'gain_covered')} | "
            f"{est} | {_fmt(s.get('true_share'))} | {yes(s, 'covered')} | {_fmt(s.get('error'))} | "
            f"{e.get('random_labels', '-')} | {e.get('control_labels', '-')} | {s.get('stop_at') or '-'} | "
            f"{s.get('gain95_at') or '-'} |"
        )
    scored = [s for s in summaries if "covered" in s]
    covered = sum(s["covered"] for s in scored)
    mae = float(np.mean([abs(s["error"]) for s in scored])) if scored else float("nan")
    timed = [s for s in summaries if "stop_within_20pct" in s]
    g_scored = [s for s in summaries if "gain_covered" in s]
    g_mae = float(np.mean([abs(s["gain_error"]) for s in g_scored])) if g_scored else float("nan")
    lines += [
        "",
        f"LL gain at equal labels: covered in **{sum(s['gain_covered'] for s in g_scored)} of {len(g_scored)}** "
        f"scored runs; mean |estimate - true| = **{g_mae:.4f} nats**.",
        f"Labels saved: covered in **{covered} of {len(scored)}** scored runs "
        f"({len(summaries) - len(scored)} not scored: no estimate "
        f"or no true value); mean |estimate - true| = **{100 * mae:.1f} points**.",
        f"STOP: landed in {sum(s.get('stop_at') is not None for s in summaries)} of {len(summaries)} runs; within 20% "
        f"of the 95%-gain label count in {sum(s['stop_within_20pct'] for s in timed)} of {len(timed)} that have both.",
    ]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool-file", default="../shared/data/preferences/hh_single_turn_train.jsonl.gz")
    ap.add_argument("--pool-rows", default="0:3000", help="rows of the pool file (start:end)")
    ap.add_argument("--test-file", default="../shared/data/preferences/hh_single_turn_test.jsonl.gz")
    ap.add_argument("--test-rows", default="0:1000", help="rows of the test file (start:end)")
    ap.add_argument("--teachers", default="near_linear,reward", help="comma-separated: near_linear, reward")
    ap.add_argument("--redundancy", default="1,4", help="comma-separated copies per item R")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per (teacher, R)")
    ap.add_argument("--initial", type=int, default=64, help="round 0 batch (RANDOM)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--curve-every", type=int, default=2, help="GetLearningCurve every this many rounds")
    ap.add_argument("--strategy", default="BALPM")
    ap.add_argument("--control-fraction", type=float, default=0.1)
    ap.add_argument("--ensemble-size", type=int, default=4)
    ap.add_argument("--hidden", default="256", help="comma-separated hidden widths of the heads")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--agreement", type=float, default=0.89)
    ap.add_argument("--teacher-seed", type=int, default=0)
    ap.add_argument("--redundancy-noise", type=float, default=0.01)
    ap.add_argument("--random-arms", type=int, default=2,
                    help="parallel pure-RANDOM runs per run; the truth uses their mean test curve")
    ap.add_argument("--workers", type=int, default=2, help="arms run at once")
    ap.add_argument("--data-dir", default="", help="server data dir (default: a temporary one)")
    ap.add_argument("--feature-cache", default=".cache/bench_feature_cache.sqlite3",
                    help="the extractor's text -> vector cache (kept between runs)")
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="smoke run: 600 rows, 2 runs, 4 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.pool_rows, args.test_rows, args.seeds, args.rounds = "0:600", "0:200", 1, 4
        args.teachers, args.redundancy, args.curve_every = "near_linear", "1", 2
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run every (teacher, R, seed) with both arms and write the tables."""
    import tempfile

    args = parse_args(argv)
    started = time.perf_counter()
    pool = load_split(args.pool_file, 0, heldout=False, rows=parse_rows(args.pool_rows))
    test = load_split(args.test_file, 0, heldout=True, rows=parse_rows(args.test_rows))
    Path(args.feature_cache).parent.mkdir(parents=True, exist_ok=True)
    feats, stats = extract_features(pool + test, cache_path=Path(args.feature_cache))
    _log(f"features of {len(pool) + len(test)} items: {stats['hits']} cached, {stats['misses']} embedded")
    pool_f, test_f = feats.take(range(len(pool))), feats.take(range(len(pool), len(pool) + len(test)))
    runs = [Run(t, int(r), s) for t in args.teachers.split(",") for r in args.redundancy.split(",")
            for s in range(args.seeds)]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / ("savings_coverage_quick.jsonl" if args.quick else "savings_coverage.jsonl")
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="balpm-coverage-"))
    server = InProcessServer(data_dir, device="cpu", model_path="", pooling="mean")
    summaries: list[dict[str, Any]] = []
    try:
        with Client(server.target, timeout_s=600) as client, jsonl.open("w") as out:
            datas = {run: oracle_for(run, pool, test, pool_f, test_f, args) for run in runs}
            arms = ("active", *(f"random{k}" for k in range(args.random_arms)))
            tasks = [(run, arm) for run in runs for arm in arms]
            with ThreadPoolExecutor(args.workers) as ex:
                done = dict(zip(tasks, ex.map(lambda t: run_arm(client, t[0], t[1], datas[t[0]], args), tasks),
                                strict=True))
            for run in runs:
                for arm in arms:
                    for rec in done[(run, arm)]:
                        out.write(json.dumps(rec) + "\n")
                summary = summarise(run, done[(run, "active")], [done[(run, a)] for a in arms[1:]])
                summary["teacher_info"] = datas[run].info
                summaries.append(summary)
                out.write(json.dumps(summary) + "\n")
    finally:
        server.stop()
    md = out_dir / ("savings_coverage_quick.md" if args.quick else "savings_coverage.md")
    write_markdown(summaries, args, md, time.perf_counter() - started)
    print(md.read_text())


if __name__ == "__main__":
    main()
