"""Benchmark: does BAL-PM save labels? Simulated active learning through the service's own gRPC API.

Usage, the full configuration (bench/results/README, "Label efficiency"):

    python bench/label_efficiency.py \\
        --pool-file ../shared/data/preferences/hh_single_turn_train.jsonl.gz --pool-rows 0:1500 \\
        --test-file ../shared/data/preferences/hh_single_turn_test.jsonl.gz \\
        --oracles model,human --teachers near_linear,reward --redundancy 1,4 --seeds 8 --rounds 8 \\
        --initial 64 --batch-size 64 --hidden-sizes 256,64 \\
        --strategies RANDOM,BALD,BALPM --workers 2

`--quick` for a smoke run (300 pool rows, 2 seeds, 3 rounds of 32, into `<out-dir>/quick`),
`--resume` to continue an interrupted run, `--report-only` to rebuild every table and plot
from the JSONL files of `--out-dir` without running anything. The batches must fit the
smallest pool: `--initial + --rounds x --batch-size` labels <= the pool rows (R = 1).

Arms. The model oracle runs once per teacher (`--teachers`, names of
`balpm.oracles.TEACHERS`) and per redundancy R (`--redundancy 1,4`: every pool item
repeated R times with feature noise and its own teacher draw); its name is
`model-<teacher>` (`model-near_linear`, `model-reward`) in every record, table, plot and
file. The human oracle (`human`: the file's own labels) runs at R = 1 only. One arm's
files: `<out-dir>/label_efficiency_<oracle>_r<R>.{jsonl,md,png}`, e.g.
`label_efficiency_model-near_linear_r4.md`, `label_efficiency_human_r1.md`; the run's
summary (tables of every arm, settings, timings): `label_efficiency_summary.json`.

Per arm:

1. Starts a balpm server in this process (or uses `--server`), with its feature
   cache at `<data-dir>/feature_cache.sqlite3`, and computes the client-side
   features of every text through the server's own extractor and cache (the model
   oracle's teacher and its CLIENT-feature pools need them).
2. Tunes BAL-PM's beta and k on a validation split of the pool (the last
   `--val-fraction` of the pool rows, uploaded as held-out items; the test file is
   never used): BALPM runs over the grid with `--tune-seeds` seeds, scored by the
   mean validation log-likelihood over rounds 1..R. Tuned: the arms that
   `--tune-oracles` names (`model` = every model arm, `model-reward` = both Rs of that
   teacher, `model-reward_r4` = one arm), and the first arm when none before it was; an
   untuned arm takes the choice of the first tuned arm with its R, else of the first
   tuned arm. `--beta` and `--knn-k` skip tuning.
3. Runs every strategy for seeds 0..`--seeds`-1 (RANDOM: 0..max(`--seeds`,
   `--random-seeds`)-1): round 0 is the same RANDOM batch for every strategy of a seed
   (and the seed's teacher draws and copy noise are the same), then `--rounds` batches
   of the strategy. Every round is a JSON line in the arm's JSONL, tagged with the
   oracle, teacher, R, (beta, k) and the posterior-training settings.
4. Fits the posterior once on all pool labels (headroom) and writes the arm's plot (test
   LL and accuracy vs labels, mean +- SE over seeds; AUC difference to RANDOM with its
   95% interval) and markdown tables:
   * primary: the area under the test log-likelihood curve (trapezoid over the label
     counts, divided by the label range: the mean test LL over the budget) per
     strategy, and its difference to RANDOM's with a 95% bootstrap interval over seeds;
   * labels each strategy needs to reach RANDOM's final mean test LL (linear
     interpolation of the mean curve, "not reached" when it never does), the saving
     and its 95% bootstrap interval, and the share of resamples in which it is reached;
   * the same against BALD's final LL; per-batch epistemic and beta x entropy term
     magnitudes and distinct prompts per batch; BAL-PM per round; the tuning grid.

RANDOM is the reference of every comparison: its curve is the mean over all its seeds
(pooled). Bootstrap intervals resample the seeds (2,000 resamples, seeded) with
replacement; each strategy's mean is over the drawn seeds it ran, so the runs of one seed,
which share that seed's round-0 batch and labels, move together (paired), and a RANDOM
seed without a partner still counts in the reference.

Posterior training: `--bootstrap on|off`, `--patience`, `--posterior-val-fraction`,
`--train-batch-size`, `--learning-rate`, `--weight-decay` (PoolSettings fields 21-26) go
into the pool settings of every run; left out, nothing is sent and the server's defaults
apply. The values in force (read back from the server) head every table and are stored in
every record (`posterior`; what was sent: `posterior_sent`).
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
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from balpm.client import Client
from balpm.data import HiddenPair, read_jsonl
from balpm.oracles import ORACLES, TEACHERS, OracleData, PairFeatures, prepare_oracle
from balpm.simulate import SimulationConfig, load_split, parse_rows, run_simulation

STRATEGIES = ("RANDOM", "BALD", "POWER_BALD", "BALPM", "ENTROPY_ONLY")
REFERENCE = "RANDOM"
N_BOOT = 2000
CI_LEVEL = 0.95
LL = "test_log_likelihood"
COLORS = {
    "RANDOM": "tab:gray",
    "BALD": "tab:blue",
    "POWER_BALD": "tab:cyan",
    "BALPM": "tab:red",
    "ENTROPY_ONLY": "tab:green",
    "SOFTMAX_BALD": "tab:purple",
    "SOFTRANK_BALD": "tab:olive",
}
# PoolSettings fields of posterior training (proto/balpm/v1: 21-26) and the pool's epoch cap, as read back.
POSTERIOR_FIELDS = ("bootstrap", "patience", "val_fraction", "train_batch_size", "learning_rate", "weight_decay",
                    "epochs")
FILE_PREFIX = "label_efficiency_"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _names(spec: str) -> list[str]:
    """The non-empty entries of a comma-separated list."""
    return [x.strip() for x in spec.split(",") if x.strip()]


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
class Arm:
    """One oracle configuration: the oracle, its teacher (model oracle) and the redundancy R.

    Attributes:
        oracle: "human" or "model".
        teacher: Model oracle: a name of `balpm.oracles.TEACHERS` ("" for the human oracle).
        redundancy: Copies R of each pool item (1 for the human oracle).
    """

    oracle: str
    teacher: str = ""
    redundancy: int = 1

    @property
    def name(self) -> str:
        """The oracle's name in records, tables and files: "human", "model-near_linear", "model-reward"."""
        return f"model-{self.teacher}" if self.oracle == "model" and self.teacher else self.oracle

    @property
    def label(self) -> str:
        """Name and redundancy, the arm's file stem suffix: "model-near_linear_r4", "human_r1"."""
        return f"{self.name}_r{self.redundancy}"

    @property
    def caption(self) -> str:
        """One phrase naming oracle, teacher and R, for titles and table captions."""
        if self.oracle == "model":
            return f"oracle {self.name} (teacher {self.teacher or 'not recorded'}), redundancy R = {self.redundancy}"
        return f"oracle {self.name} (the file's own labels), redundancy R = {self.redundancy}"

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> Arm:
        """The arm a round record belongs to (records of older runs: oracle "model", no teacher)."""
        oracle = str(record.get("oracle", "model"))
        red = int(record.get("redundancy", 1))
        if oracle.startswith("model-"):
            return Arm("model", oracle[len("model-"):], red)
        return Arm(oracle, str(record.get("teacher") or ""), red)


def build_arms(oracles: Sequence[str], teachers: Sequence[str], redundancies: Sequence[int]) -> list[Arm]:
    """Arms in run order: per oracle, the model oracle once per teacher and R; the human oracle at R = 1."""
    arms: list[Arm] = []
    for oracle in oracles:
        if oracle == "model":
            arms += [Arm("model", t, r) for t in teachers for r in redundancies]
        else:
            arms.append(Arm(oracle, "", 1))
    return arms


def tuned_here(arm: Arm, tune_oracles: Sequence[str]) -> bool:
    """Whether `--tune-oracles` names this arm: its oracle ("model"), its name or its label."""
    return any(t in (arm.oracle, arm.name, arm.label) for t in tune_oracles)


def choice_for(arm: Arm, tuned: Mapping[Arm, tuple[float, int]]) -> tuple[Arm, tuple[float, int]]:
    """The (beta, k) an untuned arm takes: the first tuned arm with its R, else the first tuned arm."""
    for other, chosen in tuned.items():
        if other.redundancy == arm.redundancy:
            return other, chosen
    other = next(iter(tuned))
    return other, tuned[other]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One simulated run."""

    arm: Arm
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
    arm: Arm,
    pool: list[HiddenPair],
    test: list[HiddenPair],
    feats: tuple[PairFeatures, PairFeatures] | None,
    args: argparse.Namespace,
    label_seed: int,
) -> OracleData:
    return prepare_oracle(
        pool,
        test,
        arm.oracle,
        agreement=args.oracle_agreement,
        redundancy=arm.redundancy,
        noise=args.redundancy_noise,
        teacher_seed=args.teacher_seed,
        label_seed=label_seed,
        features=feats,
        teacher=arm.teacher or "reward",
    )


def posterior_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The posterior-training PoolSettings the flags set; empty: nothing is sent (the server's defaults)."""
    s: dict[str, Any] = {}
    if args.bootstrap != "default":
        s["bootstrap"] = args.bootstrap == "on"
    if args.patience:
        s["patience"] = args.patience
    if args.posterior_val_fraction is not None:
        s["val_fraction"] = args.posterior_val_fraction
    if args.train_batch_size:
        s["train_batch_size"] = args.train_batch_size
    if args.learning_rate is not None:
        s["learning_rate"] = args.learning_rate
    if args.weight_decay is not None:
        s["weight_decay"] = args.weight_decay
    return s


def effective_posterior(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """The posterior-training settings a pool of this run gets, as the server reports them.

    Creates (and deletes) an empty CLIENT pool with the run's posterior settings and epoch cap, so the
    record holds the values in force, the server's defaults included, not only what was sent.
    """
    pool_id = f"probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    extra = {"epochs": args.epochs} if args.epochs else {}
    pool = client.create_pool(pool_id, feature_source="CLIENT", feature_dim=4, **posterior_settings(args), **extra)
    try:
        return {f: getattr(pool.settings, f) for f in POSTERIOR_FIELDS}
    finally:
        client.delete_pool(pool_id)


def describe_posterior(effective: Mapping[str, Any] | None, sent: Mapping[str, Any] | None) -> str:
    """One line: the posterior-training settings in force and which of them the run set."""
    if effective is None:
        return "Posterior training: not recorded (a run before these settings were recorded)."

    def fmt(v: Any) -> str:
        return ("on" if v else "off") if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)

    values = ", ".join(f"{k} {fmt(v)}" for k, v in effective.items())
    how = ("set by this run: " + ", ".join(f"{k} {fmt(v)}" for k, v in sent.items()) + "; the rest server defaults"
           if sent else "all server defaults, nothing sent")
    return f"Posterior training (every pool of the run): {values} ({how})."


def _pool_settings(args: argparse.Namespace, data: OracleData, knn_k: int) -> dict[str, Any]:
    s: dict[str, Any] = {
        "feature_source": data.feature_source,
        "ensemble_size": args.ensemble_size,
        "hidden_sizes": [int(h) for h in args.hidden_sizes.split(",")],
        "knn_k": knn_k,
        "standardize_features": args.standardize,
        # Strategy against strategy: every pick by the strategy under test (no random control arm).
        "control_fraction": 0.0,
        **posterior_settings(args),
    }
    if data.feature_source == "CLIENT":
        s["feature_dim"] = len(data.pool[0].item["prompt_features"])
    if args.epochs:
        s["epochs"] = args.epochs
    return s


class OracleDataCache:
    """Oracle data per (arm, phase, seed): built on first use, dropped after the last run announced for it.

    A model-oracle pool carries 3 x D floats per item as Python lists (R x N items), so keeping every
    seed's copy for the whole run would add up; `expect` announces the runs, `release` ends one.
    """

    def __init__(self, build: Callable[[RunSpec], OracleData]) -> None:
        self._build = build
        self._data: dict[tuple[str, str, int], OracleData] = {}
        self._users: Counter[tuple[str, str, int]] = Counter()
        self._lock = threading.Lock()

    @staticmethod
    def _key(spec: RunSpec) -> tuple[str, str, int]:
        return (spec.arm.label, spec.phase, spec.seed)

    def expect(self, specs: Iterable[RunSpec]) -> None:
        """Announce runs that will `get` and then `release` their data."""
        with self._lock:
            for s in specs:
                self._users[self._key(s)] += 1

    def get(self, spec: RunSpec) -> OracleData:
        """The data of a run's (arm, phase, seed), built now if it is not held."""
        key = self._key(spec)
        with self._lock:
            if key not in self._data:
                self._data[key] = self._build(spec)
            return self._data[key]

    def release(self, spec: RunSpec) -> None:
        """One run is done with its data; the last one drops it (an unannounced `get` drops it at once)."""
        key = self._key(spec)
        with self._lock:
            self._users[key] -= 1
            if self._users[key] <= 0:
                self._data.pop(key, None)
                del self._users[key]

    def __len__(self) -> int:
        return len(self._data)


def run_one(
    client: Client,
    spec: RunSpec,
    data: OracleData,
    args: argparse.Namespace,
    rounds: int,
    posterior: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run one simulation and return its round records, tagged with the spec and the posterior settings.

    Args:
        client: Connected SDK client.
        spec: The run.
        data: Its oracle's items and labels.
        args: Benchmark options (sizes, heads, posterior flags).
        rounds: Acquisition rounds after round 0.
        posterior: The posterior-training settings in force (`effective_posterior`), stored in every record.

    Returns:
        One record per round; `run_wall_s` is the run's wall time (upload to the last Evaluate).
    """
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
            ("oracle", spec.arm.name),
            ("teacher", spec.arm.teacher or None),
            ("phase", spec.phase),
            ("redundancy", spec.arm.redundancy),
            ("beta", spec.beta),
            ("knn_k", spec.knn_k),
            ("d_ent", args.d_ent if args.d_ent is not None else 1.0),
            ("posterior", dict(posterior) if posterior is not None else None),
            ("posterior_sent", posterior_settings(args)),
        ),
    )
    t0 = time.perf_counter()
    recs = run_simulation(client, data.pool, data.test, config)
    wall_s = time.perf_counter() - t0
    for r in recs:
        r["run_wall_s"] = round(wall_s, 2)
    _log(f"{spec.phase} {spec.arm.label} {spec.strategy} seed {spec.seed} beta {spec.beta} k {spec.knn_k}: "
         f"final LL {recs[-1][LL]:.4f} acc {recs[-1]['test_accuracy']:.3f} ({wall_s:.0f} s)")
    return recs


RunKey = tuple[str, str, int, float, int, str]


def _run_key(phase: str, strategy: str, seed: int, beta: float, knn_k: int, sent: Mapping[str, Any] | None) -> RunKey:
    """What identifies one run of an arm, for `--resume` (records carry the same fields)."""
    return (phase, strategy, int(seed), float(beta), int(knn_k), json.dumps(dict(sent or {}), sort_keys=True))


def _spec_key(spec: RunSpec, args: argparse.Namespace) -> RunKey:
    return _run_key(spec.phase, spec.strategy, spec.seed, spec.beta, spec.knn_k, posterior_settings(args))


def _completed_runs(path: Path) -> dict[RunKey, list[dict[str, Any]]]:
    """Records of an earlier (interrupted) run of an arm grouped by run, for `--resume`."""
    done: dict[RunKey, list[dict[str, Any]]] = {}
    for r in read_jsonl_records(path):
        key = _run_key(r["phase"], r["strategy"], r["seed"], r["beta"], r["knn_k"], r.get("posterior_sent"))
        done.setdefault(key, []).append(r)
    return done


def read_jsonl_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a file ([] if it does not exist)."""
    return list(read_jsonl(path)) if path.exists() else []


def run_many(
    target: str,
    specs: Sequence[RunSpec],
    cache: OracleDataCache,
    args: argparse.Namespace,
    rounds: int,
    sink: Callable[[list[dict[str, Any]]], None],
    done: Mapping[RunKey, list[dict[str, Any]]],
    posterior: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run specs with `args.workers` parallel clients against one server.

    Specs whose complete run (`rounds` + 1 records) is already in `done` (from `--resume`) are
    not run again; their records are returned with the new ones.
    """
    out: list[dict[str, Any]] = []
    lock = threading.Lock()
    todo = []
    for spec in specs:
        have = done.get(_spec_key(spec, args), [])
        if len(have) == rounds + 1:
            out.extend(have)
        else:
            todo.append(spec)
    if len(todo) < len(specs):
        _log(f"resume: {len(specs) - len(todo)} of {len(specs)} runs already complete")
    cache.expect(todo)

    def job(spec: RunSpec) -> None:
        try:
            with Client(target, timeout_s=600) as c:
                recs = run_one(c, spec, cache.get(spec), args, rounds, posterior)
        finally:
            cache.release(spec)
        with lock:
            out.extend(recs)
            sink(recs)

    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as ex:
        for f in [ex.submit(job, s) for s in todo]:
            f.result()
    return out


def full_pool_fit(client: Client, data: OracleData, args: argparse.Namespace, arm: Arm) -> dict[str, Any]:
    """Headroom: train on every pool label once and evaluate on the test items."""
    pool_id = f"full-{arm.label}-{os.getpid()}"
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
            "oracle": arm.name,
            "redundancy": arm.redundancy,
            "labels": len(labels),
            "test_log_likelihood": ev.log_likelihood,
            "test_accuracy": ev.accuracy,
            "train_s": round(time.perf_counter() - t0, 1),
        }
    finally:
        client.delete_pool(pool_id)


# ------------------------------------------------------------------------------------ analysis


def curves(records: Iterable[dict[str, Any]], metric: str) -> dict[str, tuple[np.ndarray, dict[int, np.ndarray]]]:
    """strategy -> (labels_L, seed -> metric_L) from main-phase records (labels: those every seed of it has)."""
    by: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        by[r["strategy"]][r["seed"]][r["labels"]] = r[metric]
    out = {}
    for strat, seeds in by.items():
        labels = sorted(set.intersection(*(set(v) for v in seeds.values())))
        per_seed = {s: np.array([v[n] for n in labels]) for s, v in seeds.items()}
        out[strat] = (np.array(labels, dtype=np.float64), per_seed)
    return out


def _ordered(strategies: Iterable[str]) -> list[str]:
    """Strategies in the order of STRATEGIES (others after, by name)."""
    order = {s: i for i, s in enumerate(STRATEGIES)}
    return sorted(strategies, key=lambda s: (order.get(s, len(order)), s))


def labels_to_reach(labels_L: np.ndarray, curve_L: np.ndarray, target: float) -> float:
    """First label count where the (linearly interpolated) curve reaches `target`; inf if never."""
    for i in range(len(labels_L)):
        if curve_L[i] >= target:
            if i == 0:
                return float(labels_L[0])
            x0, x1, y0, y1 = labels_L[i - 1], labels_L[i], curve_L[i - 1], curve_L[i]
            return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0)) if y1 != y0 else float(x1)
    return math.inf


def normalised_auc(labels_L: Sequence[float] | np.ndarray, values_L: Sequence[float] | np.ndarray) -> float:
    """Area under a curve by the trapezoid rule over the label counts, divided by the label range.

    That is the curve's mean over the budget (for a test log-likelihood curve: nats per pair); a single
    point is its own mean.

    Args:
        labels_L: Label counts, increasing.
        values_L: The curve at those counts.

    Raises:
        ValueError: Empty or mismatched inputs, or label counts that do not increase.
    """
    x = np.asarray(labels_L, dtype=np.float64)
    y = np.asarray(values_L, dtype=np.float64)
    if x.size == 0 or x.shape != y.shape:
        raise ValueError(f"need matching non-empty curves, got labels {x.shape} and values {y.shape}")
    if x.size == 1:
        return float(y[0])
    if np.any(np.diff(x) <= 0):
        raise ValueError("label counts must increase")
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) / (x[-1] - x[0]))


def seed_resamples(seeds: Sequence[int], n_boot: int = N_BOOT, rng_seed: int = 0) -> np.ndarray:
    """Bootstrap resamples of the seeds: int64 [n_boot, S], each row S seeds drawn with replacement (S = len(seeds))."""
    seeds_S = np.asarray(list(seeds), dtype=np.int64)
    rng = np.random.default_rng(rng_seed)
    return seeds_S[rng.integers(0, seeds_S.size, size=(n_boot, seeds_S.size))]


def resampled_means(values_K: np.ndarray, seeds_K: Sequence[int], draws_B_S: np.ndarray) -> np.ndarray:
    """Per resample, the mean of `values_K` over the drawn seeds this side ran, with their multiplicity.

    Args:
        values_K: One value (or curve: [K, L]) per seed of this side.
        seeds_K: The seeds of those rows.
        draws_B_S: Resamples of the seeds of every side (`seed_resamples`).

    Returns:
        [B] (or [B, L]); NaN in a resample that drew none of `seeds_K`.
    """
    values = np.asarray(values_K, dtype=np.float64)
    counts_B_K = (draws_B_S[:, :, None] == np.asarray(list(seeds_K))[None, None, :]).sum(axis=1).astype(np.float64)
    n_B = counts_B_K.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_B_X = (counts_B_K @ values.reshape(values.shape[0], -1)) / n_B[:, None]
    return mean_B_X.reshape((draws_B_S.shape[0], *values.shape[1:]))


def percentile_interval(samples_B: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (empirical quantiles; NaN replicates dropped, +-inf kept)."""
    x = np.asarray(samples_B, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(x, [50 * (1 - level), 50 * (1 + level)], method="inverted_cdf")
    return float(lo), float(hi)


def _diff_replicates(
    values: Mapping[int, float], reference: Mapping[int, float], draws_B_S: np.ndarray
) -> tuple[float, np.ndarray]:
    """mean(values) - mean(reference) and its bootstrap replicates over the seed resamples."""
    v_seeds, r_seeds = sorted(values), sorted(reference)
    v_K = np.array([values[s] for s in v_seeds], dtype=np.float64)
    r_K = np.array([reference[s] for s in r_seeds], dtype=np.float64)
    diff_B = resampled_means(v_K, v_seeds, draws_B_S) - resampled_means(r_K, r_seeds, draws_B_S)
    return float(v_K.mean() - r_K.mean()), diff_B


def paired_bootstrap_diff(
    values: Mapping[int, float],
    reference: Mapping[int, float],
    *,
    n_boot: int = N_BOOT,
    rng_seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float, float]:
    """Difference of the means over seeds, mean(values) - mean(reference), with a bootstrap interval.

    The union of both sides' seeds is resampled with replacement; each side's mean is over the drawn
    seeds it has. Seeds both sides ran move together (paired by seed); a reference seed without a
    partner still counts in the reference (pooled). Resamples in which a side drew none of its seeds
    are dropped.

    Args:
        values: seed -> value of the strategy (e.g. its AUC).
        reference: seed -> value of the reference (RANDOM).
        n_boot: Resamples.
        rng_seed: Seed of the resampling.
        level: Coverage of the interval.

    Returns:
        (point difference, interval low, interval high).
    """
    draws = seed_resamples(sorted(set(values) | set(reference)), n_boot, rng_seed)
    point, diff_B = _diff_replicates(values, reference, draws)
    lo, hi = percentile_interval(diff_B, level)
    return point, lo, hi


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0


def _at(labels_L: np.ndarray, values_L: np.ndarray, at_M: np.ndarray) -> np.ndarray:
    """The curve at a subset of its label counts."""
    return values_L[np.searchsorted(labels_L, at_M)]


Curves = dict[str, tuple[np.ndarray, dict[int, np.ndarray]]]


def _reference_setup(
    records: list[dict[str, Any]], reference: str, n_boot: int, rng_seed: int
) -> tuple[Curves, tuple[np.ndarray, dict[int, np.ndarray]], np.ndarray] | None:
    """The test-LL curves, the reference's, and one set of seed resamples for every strategy (None: no reference)."""
    cur = curves(records, LL)
    if reference not in cur:
        return None
    draws = seed_resamples(sorted(set().union(*(set(ps) for _, ps in cur.values()))), n_boot, rng_seed)
    return cur, cur[reference], draws


def auc_table(
    records: list[dict[str, Any]],
    *,
    n_boot: int = N_BOOT,
    rng_seed: int = 0,
    reference: str = REFERENCE,
    level: float = CI_LEVEL,
) -> list[dict[str, Any]]:
    """Per strategy: the normalised AUC of its test LL curve and the difference to the reference's AUC.

    AUC: `normalised_auc` of each seed's curve over the label counts the strategy shares with the
    reference, mean over seeds (+- SE). The difference to the reference's AUC (mean over all the
    reference's seeds) has a bootstrap interval over seeds (`paired_bootstrap_diff`; one set of
    resamples for every strategy); `share_above` is the share of resamples with a positive difference.

    Returns:
        Rows in STRATEGIES order; [] without reference runs.
    """
    setup = _reference_setup(records, reference, n_boot, rng_seed)
    if setup is None:
        return []
    cur, (ref_L, ref_seeds), draws = setup
    rows = []
    for strat in _ordered(cur):
        lab_L, per_seed = cur[strat]
        common_M = np.intersect1d(lab_L, ref_L)
        if common_M.size == 0:
            continue
        auc = {s: normalised_auc(common_M, _at(lab_L, v, common_M)) for s, v in per_seed.items()}
        ref_auc = {s: normalised_auc(common_M, _at(ref_L, v, common_M)) for s, v in ref_seeds.items()}
        point, diff_B = _diff_replicates(auc, ref_auc, draws)
        lo, hi = percentile_interval(diff_B, level)
        valid_B = diff_B[~np.isnan(diff_B)]
        auc_S = np.array(list(auc.values()))
        rows.append(
            {
                "strategy": strat,
                "auc": float(auc_S.mean()),
                "auc_se": _se(auc_S),
                "reference": reference,
                "reference_auc": float(np.mean(list(ref_auc.values()))),
                "auc_diff": point,
                "ci_lo": lo,
                "ci_hi": hi,
                "share_above": float(np.mean(valid_B > 0)) if valid_B.size else math.nan,
                "labels_from": float(common_M[0]),
                "labels_to": float(common_M[-1]),
                "n_seeds": len(auc),
                "n_reference_seeds": len(ref_auc),
                "n_paired": len(set(auc) & set(ref_auc)),
                "n_boot": n_boot,
            }
        )
    return rows


def savings_table(
    records: list[dict[str, Any]],
    n_boot: int = N_BOOT,
    rng_seed: int = 0,
    reference: str = REFERENCE,
    level: float = CI_LEVEL,
) -> list[dict[str, Any]]:
    """Per strategy: labels to reach `reference`'s final mean test LL, the saving and a bootstrap interval over seeds.

    The target is the reference's final test LL, mean over all its seeds; a strategy's labels
    needed are where its mean curve first reaches it (`labels_to_reach`; inf = not reached). The
    saving is 1 - needed / (the reference's final label count). Bootstrap as `paired_bootstrap_diff`:
    in each resample the target and the strategy's curve are means over the drawn seeds; a
    resample in which the strategy does not reach the target counts as a saving of -inf (an interval
    bound at -inf is printed "n/a"), and `reached_share` is the share of resamples that reach it.

    Returns:
        Rows in STRATEGIES order; [] without reference runs.
    """
    setup = _reference_setup(records, reference, n_boot, rng_seed)
    if setup is None:
        return []
    cur, (ref_L, ref_seeds), draws = setup
    r_seeds = sorted(ref_seeds)
    ref_final_K = np.array([ref_seeds[s][-1] for s in r_seeds])
    target = float(ref_final_K.mean())
    n_final = float(ref_L[-1])
    target_B = resampled_means(ref_final_K, r_seeds, draws)
    rows = []
    for strat in _ordered(cur):
        lab_L, per_seed = cur[strat]
        s_seeds = sorted(per_seed)
        mat_K_L = np.stack([per_seed[s] for s in s_seeds])
        need = labels_to_reach(lab_L, mat_K_L.mean(axis=0), target)
        means_B_L = resampled_means(mat_K_L, s_seeds, draws)
        sav_B = np.full(n_boot, math.nan)
        for b in range(n_boot):
            if not (math.isnan(target_B[b]) or math.isnan(means_B_L[b, 0])):
                n_b = labels_to_reach(lab_L, means_B_L[b], float(target_B[b]))
                sav_B[b] = 1.0 - n_b / n_final if math.isfinite(n_b) else -math.inf
        valid_B = sav_B[~np.isnan(sav_B)]
        lo, hi = percentile_interval(sav_B, level)
        final_K = mat_K_L[:, -1]
        rows.append(
            {
                "strategy": strat,
                "reference": reference,
                "target_ll": target,
                "reference_labels": n_final,
                "labels_needed": need,
                "reached": math.isfinite(need),
                "saving": 1.0 - need / n_final if math.isfinite(need) else -math.inf,
                "ci_lo": lo,
                "ci_hi": hi,
                "reached_share": float(np.mean(np.isfinite(valid_B))) if valid_B.size else math.nan,
                "final_ll": float(final_K.mean()),
                "final_ll_se": _se(final_K),
                "n_seeds": len(s_seeds),
                "n_reference_seeds": len(r_seeds),
                "n_boot": n_boot,
            }
        )
    return rows


def final_means(records: list[dict[str, Any]], metric: str) -> dict[str, tuple[float, float]]:
    """strategy -> (mean, SE) over seeds of the metric at its last label count."""
    out = {}
    for strat, (_, per_seed) in curves(records, metric).items():
        final_K = np.array([v[-1] for v in per_seed.values()])
        out[strat] = (float(final_K.mean()), _se(final_K))
    return out


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


def plot(records: list[dict[str, Any]], title: str, path: Path, auc_rows: Sequence[dict[str, Any]] = ()) -> None:
    """Test LL and accuracy vs labels (mean +- SE over seeds); with `auc_rows`, AUC - RANDOM with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_panels = 3 if auc_rows else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 4.2))
    for ax, metric, name in ((axes[0], LL, "test log-likelihood"), (axes[1], "test_accuracy", "test accuracy")):
        cur = curves(records, metric)
        for strat in _ordered(cur):
            lab, per_seed = cur[strat]
            mat = np.stack(list(per_seed.values()))
            m = mat.mean(axis=0)
            se = mat.std(axis=0, ddof=1) / math.sqrt(mat.shape[0]) if mat.shape[0] > 1 else np.zeros_like(m)
            ax.plot(lab, m, marker="o", ms=3, label=f"{strat} (n={mat.shape[0]})", color=COLORS.get(strat))
            ax.fill_between(lab, m - se, m + se, alpha=0.2, color=COLORS.get(strat))
        ax.set_xlabel("labels")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if auc_rows:
        ax = axes[2]
        rows = list(auc_rows)
        ys = np.arange(len(rows))
        diff = np.array([r["auc_diff"] for r in rows])
        err = np.array([[r["auc_diff"] - r["ci_lo"] for r in rows], [r["ci_hi"] - r["auc_diff"] for r in rows]])
        for i, r in enumerate(rows):
            ax.errorbar(diff[i : i + 1], ys[i : i + 1], xerr=np.nan_to_num(err[:, i : i + 1]), fmt="o", capsize=3,
                        color=COLORS.get(r["strategy"], "black"))
        ax.axvline(0.0, color="tab:gray", lw=1)
        ax.set_yticks(ys, [r["strategy"] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel(f"AUC - {rows[0]['reference']} AUC (mean test LL over labels), 95% CI")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt_labels(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) else "not reached"


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else "n/a"


def _fmt_share(x: float) -> str:
    return f"{100 * x:.0f}% of resamples" if math.isfinite(x) else "n/a"


def _reach_lines(rows: list[dict[str, Any]], arm: Arm, title: str) -> list[str]:
    """The markdown block of one `savings_table`."""
    if not rows:
        return []
    r0 = rows[0]
    ref, n_ref = r0["reference"], r0["reference_labels"]
    lines = [
        f"## {title}",
        "",
        f"{arm.caption[0].upper()}{arm.caption[1:]}. Target: {ref}'s final test LL, {r0['target_ll']:.4f} at "
        f"{n_ref:,.0f} labels (mean over its {r0['n_reference_seeds']} seeds). Labels needed: where the strategy's "
        "mean curve first reaches the target (linear interpolation between rounds); \"not reached\" when it stays "
        f"below it up to its last round. Saving = 1 - needed / {n_ref:,.0f}; 95% bootstrap interval over seeds "
        f"({r0['n_boot']:,} resamples, paired by seed; \"n/a\" = a bound at \"not reached\"); reached = share of "
        "resamples in which the strategy's mean curve reaches that resample's target.",
        "",
        "| strategy | labels needed | saving | 95% CI | reached | final test LL (+- SE) | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {_fmt_labels(r['labels_needed'])} | {_fmt_pct(r['saving'])} | "
            f"[{_fmt_pct(r['ci_lo'])}, {_fmt_pct(r['ci_hi'])}] | {_fmt_share(r['reached_share'])} | "
            f"{r['final_ll']:.4f} +- {r['final_ll_se']:.4f} | {r['n_seeds']} |"
        )
    own = next((r for r in rows if r["strategy"] == ref), None)
    if own is not None and own["labels_needed"] < n_ref:
        lines += ["", f"Caution: {ref}'s own mean curve reaches its final LL at {own['labels_needed']:,.0f} labels, "
                  f"before its last round: the curve is flat or not monotone there, so labels needed and savings say "
                  "little on this arm; read the AUC."]
    return lines


def render_markdown(
    arm: Arm,
    records: list[dict[str, Any]],
    tune: list[dict[str, Any]],
    chosen: tuple[float, int],
    chosen_from: str,
    info: Mapping[str, Any],
    headroom: Mapping[str, Any] | None,
    header: str,
    *,
    n_boot: int = N_BOOT,
) -> tuple[str, dict[str, Any]]:
    """The arm's markdown report and its tables.

    Args:
        arm: The arm (named with its teacher and R in the title and every table's caption).
        records: Its main-phase round records.
        tune: `summarise_tuning` rows of its tuning runs ([] if it took another arm's choice).
        chosen: BAL-PM's (beta, k).
        chosen_from: Where they come from, for the text.
        info: The oracle's description (`OracleData.info`).
        headroom: `full_pool_fit` result, or None.
        header: Command, machine and scale lines.
        n_boot: Bootstrap resamples.

    Returns:
        (markdown, {"auc", "savings", "vs_bald", "batches"}).
    """
    auc = auc_table(records, n_boot=n_boot)
    savings = savings_table(records, n_boot=n_boot)
    vs_bald = savings_table(records, n_boot=n_boot, reference="BALD")
    diag = batch_diagnostics(records)
    acc = final_means(records, "test_accuracy")
    final_ll = final_means(records, LL)
    seeds_by: dict[str, set[int]] = defaultdict(set)
    for r in records:
        seeds_by[r["strategy"]].add(r["seed"])
    first = records[0] if records else {}
    cap = arm.caption[0].upper() + arm.caption[1:]
    n_other = sorted({len(v) for s, v in seeds_by.items() if s != REFERENCE})
    lines = [f"# Label efficiency: {arm.name} oracle, redundancy R = {arm.redundancy}", "", header, ""]
    lines += [
        f"Arm: {arm.caption}; seeds per strategy {'/'.join(map(str, n_other)) or '-'} "
        f"({REFERENCE}: {len(seeds_by.get(REFERENCE, ()))}); BAL-PM beta = {chosen[0]:g}, k = {chosen[1]} "
        f"({chosen_from}).  ",
        describe_posterior(first.get("posterior"), first.get("posterior_sent")) + "  ",
        "Oracle: `" + json.dumps(dict(info), default=str) + "`",
        "",
    ]
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
    if auc:
        a0 = auc[0]
        lines += [
            "## Area under the test log-likelihood curve (primary)",
            "",
            f"{cap}. AUC = trapezoid area under a seed's test LL curve over labels {a0['labels_from']:,.0f}.."
            f"{a0['labels_to']:,.0f}, divided by that range: the mean test LL over the budget (nats per pair), mean "
            f"over seeds +- SE. AUC - {REFERENCE}: against {REFERENCE}'s AUC, {a0['reference_auc']:.4f} (mean over "
            f"its {a0['n_reference_seeds']} seeds), with a 95% bootstrap interval over seeds ({a0['n_boot']:,} "
            "resamples, paired by seed: a seed's runs share its round-0 batch and teacher draws); above = share of "
            f"resamples in which the difference is positive. Final values at each strategy's last round.",
            "",
            f"| strategy | AUC (+- SE) | AUC - {REFERENCE} | 95% CI | above {REFERENCE} | final test LL (+- SE) | "
            "final accuracy | distinct prompts / batch | seeds |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in auc:
            s = r["strategy"]
            d = diag.get(s, {})
            is_ref = s == REFERENCE
            lines.append(
                f"| {s} | {r['auc']:.4f} +- {r['auc_se']:.4f} | "
                + ("(reference) | - | - | " if is_ref else
                   f"{r['auc_diff']:+.4f} | [{r['ci_lo']:+.4f}, {r['ci_hi']:+.4f}] | {_fmt_share(r['share_above'])} | ")
                + f"{final_ll[s][0]:.4f} +- {final_ll[s][1]:.4f} | {acc[s][0]:.3f} | "
                f"{d.get('distinct_prompts', math.nan):.1f} / {d.get('batch_size', math.nan):.0f} | {r['n_seeds']} |"
            )
        lines.append("")
    lines += _reach_lines(savings, arm, f"Labels to reach {REFERENCE}'s final mean test LL")
    if vs_bald:
        lines += ["", *_reach_lines(vs_bald, arm, "Labels to reach BALD's final mean test LL")]
    if diag:
        lines += ["", "## Batches", "",
                  f"{cap}. Batch composition and score terms (means over rounds >= 1 and seeds; `range` = max - min "
                  "within a batch):", "",
                  "| strategy | distinct prompts / batch | epistemic (BALD) | epistemic range | beta x entropy | "
                  "beta x entropy range |", "| --- | --- | --- | --- | --- | --- |"]
        for strat in _ordered(diag):
            d = diag[strat]
            lines.append(
                f"| {strat} | {d['distinct_prompts']:.1f} / {d['batch_size']:.0f} | {d['mean_epistemic']:.4f} | "
                f"{d['epistemic_range']:.4f} | {d['beta_entropy']:.4f} | {d['beta_entropy_range']:.4f} |"
            )
    terms = per_round_terms(records, "BALPM")
    if terms:
        lines += ["", f"BAL-PM per round (means over seeds; {arm.caption}):", "",
                  "| round | labels | epistemic | epistemic range | beta x entropy | beta x entropy range | "
                  "distinct prompts |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for t in terms:
            lines.append(
                f"| {t['round']} | {t['labels']:.0f} | {t['mean_epistemic']:.4f} | {t['epistemic_range']:.4f} | "
                f"{t['beta_entropy']:.4f} | {t['beta_entropy_range']:.4f} | {t['distinct_prompts']:.1f} |"
            )
    if tune:
        lines += ["", "## BAL-PM tuning", "",
                  f"{cap}. On the validation split of the pool (never the test file); score = mean validation LL over "
                  "rounds >= 1, mean over tuning seeds:", "",
                  "| beta | k | validation score | final validation LL | distinct prompts / batch | runs |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for t in tune:
            mark = " **chosen**" if (t["beta"], t["knn_k"]) == tuple(chosen) else ""
            lines.append(
                f"| {t['beta']} | {t['knn_k']} | {t['score']:.4f}{mark} | {t['final']:.4f} | "
                f"{t['distinct_prompts']:.1f} | {t['runs']} |"
            )
    tables = {"auc": auc, "savings": savings, "vs_bald": vs_bald, "batches": diag}
    return "\n".join(lines) + "\n", tables


def write_arm_outputs(
    out_dir: Path,
    arm: Arm,
    records: list[dict[str, Any]],
    tune: list[dict[str, Any]],
    chosen: tuple[float, int],
    chosen_from: str,
    info: Mapping[str, Any],
    headroom: Mapping[str, Any] | None,
    header: str,
    stem: str = "",
) -> dict[str, Any]:
    """Write the arm's markdown and plot (`<out-dir>/label_efficiency_<stem>.{md,png}`); returns the tables."""
    stem = stem or arm.label
    text, tables = render_markdown(arm, records, tune, chosen, chosen_from, info, headroom, header)
    (out_dir / f"{FILE_PREFIX}{stem}.md").write_text(text, encoding="utf-8")
    n_seeds = len({r["seed"] for r in records})
    plot(records, f"{arm.caption}; {n_seeds} seeds, mean +- SE", out_dir / f"{FILE_PREFIX}{stem}.png", tables["auc"])
    return tables


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
    """Command-line options (lists are parsed into `args.oracle_list`, `teacher_list`, `redundancy_list`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool-file", default="../shared/data/preferences/hh_single_turn_train.jsonl.gz")
    p.add_argument("--pool-rows", default="", help="row range START:STOP of the pool file")
    p.add_argument("--test-file", default="../shared/data/preferences/hh_single_turn_test.jsonl.gz")
    p.add_argument("--test-rows", default="", help="row range START:STOP of the test file")
    p.add_argument("--oracles", default="model,human", help=f"comma-separated: {', '.join(ORACLES)}")
    p.add_argument("--teachers", default="near_linear,reward",
                   help=f"model oracle teachers, comma-separated: {', '.join(TEACHERS)}; one arm each")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", type=int, default=8, help="number of seeds (0..N-1) of every strategy")
    p.add_argument("--random-seeds", type=int, default=0,
                   help="RANDOM seeds if more than --seeds (the pooled reference curve; 0 = --seeds)")
    p.add_argument("--initial", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--ensemble-size", type=int, default=5)
    p.add_argument("--hidden-sizes", default="2048,256")
    p.add_argument("--epochs", type=int, default=0, help="max epochs per update (0 = server default)")
    p.add_argument("--standardize", action="store_true", help="pool setting standardize_features")
    post = p.add_argument_group("posterior training (PoolSettings 21-26 of every pool; unset = server default)")
    post.add_argument("--bootstrap", choices=["on", "off", "default"], default="default",
                      help="each member trains on its own bootstrap resample of the labels")
    post.add_argument("--patience", type=int, default=0, help="epochs without validation improvement (1..1000)")
    post.add_argument("--posterior-val-fraction", type=float, default=None,
                      help="share of the labels held out for early stopping (0..0.5; 0 disables it)")
    post.add_argument("--train-batch-size", type=int, default=0, help="label pairs per minibatch (1..4096)")
    post.add_argument("--learning-rate", type=float, default=None, help="AdamW learning rate (0 < lr <= 1)")
    post.add_argument("--weight-decay", type=float, default=None, help="AdamW decoupled weight decay (0..1)")
    p.add_argument("--oracle-agreement", type=float, default=0.89)
    p.add_argument("--redundancy", default="1,4",
                   help="copies R of each pool item, comma-separated (model oracle; one arm each; human: R = 1)")
    p.add_argument("--redundancy-noise", type=float, default=0.01)
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--tune-betas", default="0,0.01,0.1,1")
    p.add_argument("--tune-ks", default="5,13")
    p.add_argument("--tune-seeds", type=int, default=2)
    p.add_argument("--tune-rounds", type=int, default=4)
    p.add_argument("--tune-oracles", default="model",
                   help="arms to tune on, by oracle (model), name (model-reward) or label (model-reward_r4); "
                   "the others take the choice of the first tuned arm with their R, else of the first")
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
        help="keep the complete runs already in <out-dir>/label_efficiency_<oracle>_r<R>.jsonl, run only the rest",
    )
    p.add_argument("--no-headroom", action="store_true", help="skip the all-pool-labels fit")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny pool, 2 seeds, 3 rounds, into <out-dir>/quick")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild plots and markdown from <out-dir>/label_efficiency_*.jsonl (and the summary JSON, if any)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.pool_rows = args.pool_rows or "0:300"
        args.test_rows = args.test_rows or "0:100"
        args.seeds, args.rounds, args.initial, args.batch_size = min(args.seeds, 2), 3, 32, 32
        args.random_seeds = min(args.random_seeds, 3)
        args.hidden_sizes, args.ensemble_size = "64", 3
        args.tune_betas, args.tune_ks, args.tune_seeds, args.tune_rounds = "0,0.1", "13", 1, 2
        args.out_dir = args.out_dir + "/quick"
    args.oracle_list = _names(args.oracles)
    args.teacher_list = _names(args.teachers)
    try:
        args.redundancy_list = [int(r) for r in _names(args.redundancy)]
    except ValueError:
        p.error(f"--redundancy: integers, comma-separated, got {args.redundancy!r}")
    if bad := [o for o in args.oracle_list if o not in ORACLES]:
        p.error(f"--oracles: unknown {bad}; choose from {', '.join(ORACLES)}")
    if bad := [t for t in args.teacher_list if t not in TEACHERS]:
        p.error(f"--teachers: unknown {bad}; choose from {', '.join(TEACHERS)}")
    if "model" in args.oracle_list and not (args.teacher_list and args.redundancy_list):
        p.error("the model oracle needs at least one --teachers and one --redundancy")
    if any(r < 1 for r in args.redundancy_list):
        p.error("--redundancy: every R must be >= 1")
    checks = (
        ("--patience", args.patience, lambda v: v == 0 or 1 <= v <= 1000),
        ("--posterior-val-fraction", args.posterior_val_fraction, lambda v: v is None or 0 <= v <= 0.5),
        ("--train-batch-size", args.train_batch_size, lambda v: v == 0 or 1 <= v <= 4096),
        ("--learning-rate", args.learning_rate, lambda v: v is None or 0 < v <= 1),
        ("--weight-decay", args.weight_decay, lambda v: v is None or 0 <= v <= 1),
    )
    for flag, value, ok in checks:
        if not ok(value):
            p.error(f"{flag} {value} is out of range (see --help)")
    if (args.beta is None) != (args.knn_k is None):
        p.error("--beta and --knn-k go together (both skip tuning)")
    return args


def _header_fallback(summary: Mapping[str, Any]) -> str:
    if "header" in summary:
        return str(summary["header"])
    if "command" in summary:
        return f"Command: `{summary['command']}`  \nMachine: {summary.get('machine', 'not recorded')}"
    return "Rebuilt from the JSONL alone (no label_efficiency_summary.json): command and machine not recorded."


def report_only(args: argparse.Namespace) -> None:
    """Rebuild every arm's PNG and markdown from `<out-dir>/label_efficiency_*.jsonl` (no runs).

    The JSONL alone suffices: arm, (beta, k) and posterior settings come from the records. The summary
    JSON, when there is one, adds the command and machine, the headroom fit, the oracle's description
    and where (beta, k) came from, and gets the rebuilt tables. Older runs' files
    (`label_efficiency_model.jsonl`, keyed `oracles` in the summary) are rebuilt under their own names.
    """
    out_dir = Path(args.out_dir)
    summary_path = out_dir / "label_efficiency_summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    key = "oracles" if "oracles" in summary and "arms" not in summary else "arms"
    entries: dict[str, Any] = summary.setdefault(key, {})
    header = _header_fallback(summary)
    paths = sorted(out_dir.glob(f"{FILE_PREFIX}*.jsonl"))
    if not paths:
        raise SystemExit(f"--report-only: no {FILE_PREFIX}*.jsonl in {out_dir}")
    for path in paths:
        stem = path.stem[len(FILE_PREFIX):]
        recs = read_jsonl_records(path)
        main_recs = [r for r in recs if r.get("phase", "main") == "main"]
        if not main_recs or "strategy" not in main_recs[0]:
            _log(f"{path.name}: no main-phase round records, skipped")
            continue
        arm = Arm.from_record(main_recs[0])
        tune_rows = summarise_tuning([r for r in recs if r.get("phase") == "tune"])
        e = entries.setdefault(stem, {})
        balpm = [r for r in main_recs if r["strategy"] == "BALPM"] or main_recs
        chosen = (float(e.get("chosen_beta", balpm[0]["beta"])), int(e.get("chosen_k", balpm[0]["knn_k"])))
        chosen_from = e.get("chosen_from") or ("tuned on this arm's validation split" if tune_rows else "not recorded")
        info = e.get("info") or {"oracle": arm.name, "teacher": arm.teacher or None, "redundancy": arm.redundancy}
        tables = write_arm_outputs(out_dir, arm, main_recs, tune_rows, chosen, chosen_from, info, e.get("headroom"),
                                   header, stem=stem)
        e.update({"chosen_beta": chosen[0], "chosen_k": chosen[1], "chosen_from": chosen_from, "info": info,
                  "headroom": e.get("headroom"), "table": tables["savings"], "auc": tables["auc"]})
        _log(f"{path.name}: rebuilt {FILE_PREFIX}{stem}.md and .png from {len(main_recs)} round records")
    summary.setdefault("header", header)
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")


def _check_budget(args: argparse.Namespace, arms: Sequence[Arm], n_pool: int, n_tune_pool: int) -> None:
    """Stop before any run if a run would ask for more labels than its pool has."""
    smallest = min(a.redundancy for a in arms)
    need = args.initial + args.rounds * args.batch_size
    if need > smallest * n_pool:
        raise SystemExit(f"{args.initial} + {args.rounds} x {args.batch_size} = {need} labels > the "
                         f"{smallest * n_pool} items of the smallest pool (R = {smallest}): fewer rounds, smaller "
                         "batches or more pool rows")
    need_tune = args.initial + args.tune_rounds * args.batch_size
    if args.beta is None and need_tune > smallest * n_tune_pool:
        raise SystemExit(f"tuning: {need_tune} labels > the {smallest * n_tune_pool} items of the smallest tuning pool")


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
    arms = build_arms(args.oracle_list, args.teacher_list, args.redundancy_list)
    strategies = [s.strip().upper() for s in args.strategies.split(",") if s.strip()]
    if REFERENCE not in strategies:
        strategies.insert(0, REFERENCE)
    n_seeds = args.seeds
    n_random = max(args.seeds, args.random_seeds)
    tune_oracles = _names(args.tune_oracles)

    pool_all = load_split(args.pool_file, 0, heldout=False, rows=parse_rows(args.pool_rows))
    test = load_split(args.test_file, 1, heldout=True, rows=parse_rows(args.test_rows))
    n_val = int(len(pool_all) * args.val_fraction)
    tune_pool = pool_all[: len(pool_all) - n_val]
    val = load_split(args.pool_file, 2, heldout=True, rows=parse_rows(args.pool_rows))[len(pool_all) - n_val :]
    _log(f"pool {len(pool_all)} rows (tuning: {len(tune_pool)} pool + {len(val)} validation), test {len(test)} rows; "
         f"arms {', '.join(a.label for a in arms)}")
    _check_budget(args, arms, len(pool_all), len(tune_pool))

    server = None
    if args.server:
        target = args.server
    else:
        server = InProcessServer(Path(args.data_dir), device=args.device, model_path=args.model_path,
                                 pooling=args.pooling)
        target = server.target
    try:
        feats: dict[str, PairFeatures] = {}
        if any(a.oracle == "model" for a in arms):
            f_all = _features_for(pool_all + val + test, args)
            n_p, n_v = len(pool_all), len(val)
            feats["pool"], feats["val"] = f_all.take(range(n_p)), f_all.take(range(n_p, n_p + n_v))
            feats["test"] = f_all.take(range(n_p + n_v, len(f_all)))
            feats["tune_pool"] = feats["pool"].take(range(len(tune_pool)))

        def build(spec: RunSpec) -> OracleData:
            model = spec.arm.oracle == "model"
            if spec.phase == "tune":
                return _oracle_data(spec.arm, tune_pool, val, (feats["tune_pool"], feats["val"]) if model else None,
                                    args, label_seed=spec.seed)
            return _oracle_data(spec.arm, pool_all, test, (feats["pool"], feats["test"]) if model else None, args,
                                label_seed=spec.seed)

        with Client(target, timeout_s=600) as c:
            posterior = effective_posterior(c, args)
        sent = posterior_settings(args)
        _log(describe_posterior(posterior, sent))
        header = (
            f"Command: `{command}`  \nMachine: {machine()}  \nScale: pool {args.pool_file} rows "
            f"{args.pool_rows or 'all'} ({len(pool_all)} items before redundancy), test {args.test_file} rows "
            f"{args.test_rows or 'all'} ({len(test)} items); initial {args.initial} RANDOM + {args.rounds} x "
            f"{args.batch_size}; seeds {n_seeds} per strategy ({REFERENCE}: {n_random}); ensemble "
            f"{args.ensemble_size} x [{args.hidden_sizes}] tanh, epochs {args.epochs or 'server default'}; "
            f"features: {args.model_path or 'bundled all-MiniLM-L6-v2'} ({args.pooling} pooling).  \n"
            f"Arms: {', '.join(a.label for a in arms)}."
        )
        summary: dict[str, Any] = {"command": command, "machine": machine(), "header": header,
                                   "posterior": posterior, "posterior_sent": sent, "arms": {}}
        summary_path = out_dir / "label_efficiency_summary.json"
        tuned: dict[Arm, tuple[float, int]] = {}
        for arm in arms:
            t_o = time.perf_counter()
            jsonl = out_dir / f"{FILE_PREFIX}{arm.label}.jsonl"
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

            cache = OracleDataCache(build)
            tune_rows: list[dict[str, Any]] = []
            try:
                if args.beta is not None:
                    chosen, chosen_from = (float(args.beta), int(args.knn_k)), "set by --beta / --knn-k"
                elif tuned_here(arm, tune_oracles) or not tuned:
                    grid = [(float(b), int(k)) for b in args.tune_betas.split(",") for k in args.tune_ks.split(",")]
                    specs = [RunSpec(arm, "BALPM", s, "tune", b, k) for s in range(args.tune_seeds) for b, k in grid]
                    _log(f"{arm.label}: tuning BAL-PM over {len(grid)} (beta, k) x {args.tune_seeds} seeds")
                    tune_recs = run_many(target, specs, cache, args, args.tune_rounds, sink, done, posterior)
                    tune_rows = summarise_tuning(tune_recs)
                    best = max(tune_rows, key=lambda t: t["score"])
                    chosen, chosen_from = (best["beta"], best["knn_k"]), "tuned on this arm's validation split"
                    tuned[arm] = chosen
                    _log(f"{arm.label}: chose beta {chosen[0]}, k {chosen[1]}")
                else:
                    other, chosen = choice_for(arm, tuned)
                    chosen_from = f"from the tuning of {other.label}"
                specs = [RunSpec(arm, st, s, "main", chosen[0], chosen[1]) for s in range(n_random)
                         for st in strategies if st == REFERENCE or s < n_seeds]
                main_recs = run_many(target, specs, cache, args, args.rounds, sink, done, posterior)
            finally:
                fh.close()
            spec0 = RunSpec(arm, REFERENCE, 0, "main", chosen[0], chosen[1])
            data0 = cache.get(spec0)
            info = data0.info
            headroom = None
            if not args.no_headroom:
                with Client(target, timeout_s=600) as c:
                    headroom = full_pool_fit(c, data0, args, arm)
                _log(f"{arm.label}: headroom {headroom}")
            cache.release(spec0)
            del data0
            tables = write_arm_outputs(out_dir, arm, main_recs, tune_rows, chosen, chosen_from, info, headroom, header)
            run_s = [r["run_wall_s"] for r in main_recs if r["round"] == 0 and "run_wall_s" in r]
            summary["arms"][arm.label] = {
                "oracle": arm.name,
                "teacher": arm.teacher or None,
                "redundancy": arm.redundancy,
                "chosen_beta": chosen[0],
                "chosen_k": chosen[1],
                "chosen_from": chosen_from,
                "auc": tables["auc"],
                "table": tables["savings"],
                "vs_bald": tables["vs_bald"],
                "headroom": headroom,
                "info": info,
                "main_runs": len(specs),
                "mean_run_wall_s": round(float(np.mean(run_s)), 1) if run_s else None,
                "minutes": round((time.perf_counter() - t_o) / 60, 1),
            }
            summary["minutes"] = round((time.perf_counter() - t_start) / 60, 1)
            summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
            _log(f"{arm.label}: done in {(time.perf_counter() - t_o) / 60:.1f} min")
        _log(f"all done in {summary['minutes']} min; results in {out_dir}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
