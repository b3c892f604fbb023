"""The label-efficiency pipeline end to end on a tiny pool: model oracle with redundancy, BALD vs BAL-PM.

Each prompt appears R times (tiny feature noise, independent teacher draws), the
Reddit TL;DR situation: BALD's top-k takes every copy of its most uncertain
prompts, BAL-PM's entropy term spreads the batch over prompts. Runs through the
real server (gRPC, CLIENT-feature pools) with fixed seeds.
"""

from __future__ import annotations

from pathlib import Path

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
