"""The label-efficiency pipeline end to end on a tiny pool: model oracle with redundancy, BALD vs BAL-PM.

The second test drives bench/label_efficiency.py's own run path (an arm named by its teacher and R,
posterior-training flags in the pool settings, `--resume`, `--report-only`).

Each prompt appears R times (tiny feature noise, independent teacher draws), the
Reddit TL;DR situation: BALD's top-k takes every copy of its most uncertain
prompts, BAL-PM's entropy term spreads the batch over prompts. Runs through the
real server (gRPC, CLIENT-feature pools) with fixed seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from balpm.data import HiddenPair
from balpm.oracles import PairFeatures, model_oracle_data
from balpm.simulate import SimulationConfig, run_simulation
from tests.conftest import ServerThread, make_settings

DIM = 16
N_PROMPTS = 60
N_TEST = 40
R = 4

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a bound on a hang, not a speed test


def _pairs(n: int, prefix: str, heldout: bool, rng: np.random.Generator) -> tuple[list[HiddenPair], PairFeatures]:
    prompts = rng.normal(size=(n, DIM)).astype(np.float32)
    a = (prompts + rng.normal(size=(n, DIM))).astype(np.float32)
    b = (prompts + rng.normal(size=(n, DIM))).astype(np.float32)
    pairs = []
    for i in range(n):
        item = {"item_id": f"{prefix}{i}", "prompt": f"{prefix} prompt {i}", "completion_a": "a", "completion_b": "b"}
        if heldout:
            item["split"] = "HELDOUT"
            item["heldout_preference"] = "A"
        pairs.append(HiddenPair(item, "A"))
    return pairs, PairFeatures(prompts, a, b)


def test_balpm_spreads_batches_over_prompts_where_bald_repeats_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pool, pool_f = _pairs(N_PROMPTS, "p", False, rng)
    test, test_f = _pairs(N_TEST, "t", True, rng)
    data = model_oracle_data(pool, pool_f, test, test_f, agreement=0.89, redundancy=R, noise=0.01, label_seed=0)
    assert len(data.pool) == R * N_PROMPTS
    assert data.feature_source == "CLIENT"
    assert abs(data.info["agreement_expected"] - 0.89) < 1e-3
    assert len({p.item["prompt"] for p in data.pool}) == N_PROMPTS

    server = ServerThread(make_settings(tmp_path / "data", extractor="", device="cpu"))
    try:
        from balpm import Client

        distinct: dict[str, list[int]] = {}
        with Client(server.target, timeout_s=60) as client:
            for strategy in ("BALD", "BALPM"):
                config = SimulationConfig(
                    strategy=strategy,
                    initial=24,
                    batch_size=24,
                    rounds=3,
                    seed=0,
                    epochs=15,
                    feature_source="CLIENT",
                    pool_settings=(("feature_dim", DIM), ("ensemble_size", 3), ("hidden_sizes", [32]), ("knn_k", 5)),
                    acquire_options=(("beta", 1.0),),
                    tags=(("oracle", "model"), ("redundancy", R)),
                )
                records = run_simulation(client, data.pool, data.test, config)
                assert [r["labels"] for r in records] == [24, 48, 72, 96]
                assert all(r["oracle"] == "model" and r["redundancy"] == R for r in records)
                assert all(np.isfinite(r["test_log_likelihood"]) for r in records)
                distinct[strategy] = [r["distinct_prompts"] for r in records[1:]]
                if strategy == "BALPM":
                    assert all(r["mean_entropy"] is not None for r in records[1:])
    finally:
        server.stop()
    # The initial RANDOM batch is the same for both; afterwards BAL-PM covers more prompts in every batch.
    assert all(p > d for p, d in zip(distinct["BALPM"], distinct["BALD"], strict=True)), distinct


def test_bench_runs_an_arm_with_posterior_flags_and_rebuilds_its_report(tmp_path: Path) -> None:
    """bench/label_efficiency.py's run path on a real server: one teacher arm, posterior flags, resume, report."""
    from bench import label_efficiency as le

    rng = np.random.default_rng(1)
    pool, pool_f = _pairs(40, "p", False, rng)
    test, test_f = _pairs(N_TEST, "t", True, rng)
    args = le.parse_args(
        ["--teachers", "near_linear", "--redundancy", "2", "--seeds", "2", "--initial", "16", "--batch-size", "16",
         "--rounds", "2", "--ensemble-size", "2", "--hidden-sizes", "16", "--epochs", "10", "--workers", "1",
         "--bootstrap", "off", "--patience", "3", "--posterior-val-fraction", "0.2", "--train-batch-size", "16",
         "--learning-rate", "0.003", "--weight-decay", "0"]
    )
    arm = le.Arm("model", "near_linear", 2)

    def build(spec: le.RunSpec) -> Any:
        return model_oracle_data(pool, pool_f, test, test_f, redundancy=spec.arm.redundancy, label_seed=spec.seed,
                                 teacher=spec.arm.teacher)

    cache = le.OracleDataCache(build)
    specs = [le.RunSpec(arm, st, s, "main", 1.0, 5) for s in range(2) for st in ("RANDOM", "BALPM")]
    jsonl = tmp_path / f"label_efficiency_{arm.label}.jsonl"
    server = ServerThread(make_settings(tmp_path / "data", extractor="", device="cpu"))
    try:
        from balpm import Client

        with Client(server.target, timeout_s=60) as client:
            posterior = le.effective_posterior(client, args)
        # The server holds what the flags asked for (read back from a pool it created).
        assert posterior == {"bootstrap": False, "patience": 3, "val_fraction": pytest.approx(0.2),
                             "train_batch_size": 16, "learning_rate": pytest.approx(0.003), "weight_decay": 0.0,
                             "epochs": 10}
        with jsonl.open("w") as fh:
            def sink(recs: list[dict[str, Any]]) -> None:
                fh.write("".join(json.dumps(r) + "\n" for r in recs))

            recs = le.run_many(server.target, specs, cache, args, args.rounds, sink, {}, posterior)
        assert len(cache) == 0  # every seed's data dropped after its last run

        def must_not_run(recs: list[dict[str, Any]]) -> None:
            raise AssertionError("--resume reran a complete run")

        again = le.run_many(server.target, specs, cache, args, args.rounds, must_not_run, le._completed_runs(jsonl),
                            posterior)
    finally:
        server.stop()
    assert len(recs) == len(again) == 4 * (args.rounds + 1)
    assert {(r["oracle"], r["teacher"], r["redundancy"]) for r in recs} == {("model-near_linear", "near_linear", 2)}
    assert all(r["posterior"] == posterior for r in recs)
    assert all(r["posterior_sent"] == le.posterior_settings(args) for r in recs)
    assert recs[0]["posterior_sent"]["patience"] == 3
    assert [r["labels"] for r in recs if r["seed"] == 0 and r["strategy"] == "BALPM"] == [16, 32, 48]

    le.main(["--report-only", "--out-dir", str(tmp_path)])
    md = (tmp_path / f"label_efficiency_{arm.label}.md").read_text()
    assert md.startswith("# Label efficiency: model-near_linear oracle, redundancy R = 2")
    assert "bootstrap off, patience 3" in md and "| BALPM |" in md
    assert md.index("## Area under the test log-likelihood curve") < md.index("## Labels to reach RANDOM's")
    assert (tmp_path / f"label_efficiency_{arm.label}.png").exists()
