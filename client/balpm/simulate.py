"""Oracle replay: run the active-learning loop against a server with labels from a file.

The pool is uploaded without its labels; each round acquires a batch, reveals the
file's labels for exactly those items (the oracle), retrains and evaluates on the
held-out test items. One JSON line per round.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from balpm.client import Client
from balpm.data import HiddenPair, hide_preferences, read_jsonl


@dataclass(frozen=True)
class SimulationConfig:
    """Options of one simulated run."""

    strategy: str = "BALPM"
    initial: int = 256
    batch_size: int = 256
    rounds: int = 5
    seed: int = 0
    epochs: int = 0
    pool_id: str = ""
    feature_source: str = "SERVER"
    initial_strategy: str = "RANDOM"
    keep_pool: bool = False
    pool_settings: tuple[tuple[str, Any], ...] = ()


def _log(msg: str, stream: TextIO = sys.stderr) -> None:
    print(msg, file=stream, flush=True)


def run_simulation(
    client: Client,
    pool: list[HiddenPair],
    test: list[HiddenPair],
    config: SimulationConfig,
    *,
    out: TextIO | None = None,
    oracle: Callable[[HiddenPair], str] | None = None,
) -> list[dict[str, Any]]:
    """Run the loop and return one record per round.

    Args:
        client: Connected SDK client.
        pool: Pool items with their hidden preferences.
        test: Held-out items with their preferences.
        config: Strategy, sizes and seed.
        out: Stream for JSON lines (one per round), flushed after each.
        oracle: Maps an item to its label ("A", "B" or "TIE"); default reveals the file's.

    Returns:
        The round records.
    """
    reveal = oracle or (lambda pair: pair.preference)
    pool_id = config.pool_id or f"sim-{config.strategy.lower()}-{config.seed}-{uuid.uuid4().hex[:6]}"
    settings = dict(config.pool_settings)
    settings.setdefault("feature_source", config.feature_source)
    client.create_pool(pool_id, **settings)
    by_id = {p.item["item_id"]: p for p in pool}
    try:
        t0 = time.perf_counter()
        summary = client.upload_items(pool_id, [p.item for p in pool] + [p.item for p in test])
        if summary.rejections:
            _log(f"{len(summary.rejections)} items rejected, first: {summary.rejections[0].message}")
        last = [0.0]

        def show(pool_msg: Any) -> None:
            if time.monotonic() - last[0] > 10:
                total = pool_msg.item_count + pool_msg.heldout_count
                _log(f"featurising: {pool_msg.featurized_count}/{total} items")
                last[0] = time.monotonic()

        client.wait_pool_ready(pool_id, progress=show)
        _log(f"pool {pool_id}: {len(pool)} pool + {len(test)} test items ready in {time.perf_counter() - t0:.1f} s")
        records: list[dict[str, Any]] = []
        n_labels = 0
        for rnd in range(config.rounds + 1):
            size = config.initial if rnd == 0 else config.batch_size
            strategy = config.initial_strategy if rnd == 0 else config.strategy
            t_acq = time.perf_counter()
            batch = client.acquire(
                pool_id, batch_size=size, strategy=strategy, seed=config.seed * 1000 + rnd, annotator_id="oracle"
            )
            acquire_s = time.perf_counter() - t_acq
            labels = [
                {
                    "label_id": f"r{rnd}-{a.item.item_id}",
                    "item_id": a.item.item_id,
                    "preference": reveal(by_id[a.item.item_id]),
                    "annotator_id": "oracle",
                }
                for a in batch.items
            ]
            client.ingest_labels(pool_id, labels)
            n_labels += len(labels)
            t_train = time.perf_counter()
            client.update_posterior(pool_id, seed=config.seed * 1000 + rnd, epochs=config.epochs)
            train_s = time.perf_counter() - t_train
            ev = client.evaluate(pool_id)
            scores = [(a.scores.epistemic, a.scores.entropy) for a in batch.items]
            record = {
                "round": rnd,
                "labels": n_labels,
                "strategy": config.strategy,
                "seed": config.seed,
                "test_log_likelihood": ev.log_likelihood,
                "test_accuracy": ev.accuracy,
                "test_ece": ev.ece,
                "acquire_s": round(acquire_s, 4),
                "train_s": round(train_s, 3),
                "batch_strategy": strategy,
                "posterior_version": ev.posterior_version,
                "mean_epistemic": sum(s[0] for s in scores) / len(scores),
                "distinct_prompts": len({by_id[a.item.item_id].item["prompt"] for a in batch.items}),
            }
            records.append(record)
            if out is not None:
                out.write(json.dumps(record) + "\n")
                out.flush()
            _log(
                f"round {rnd}: {n_labels} labels, test LL {ev.log_likelihood:.4f}, acc {ev.accuracy:.3f}, "
                f"ECE {ev.ece:.3f} (acquire {acquire_s:.2f} s, train {train_s:.1f} s)"
            )
        return records
    finally:
        if not config.keep_pool:
            client.delete_pool(pool_id)


def load_split(path: str | Path, seed: int, *, heldout: bool, limit: int = 0) -> list[HiddenPair]:
    """Read a file in the shared format and hide its preferences (held-out ids get a "test-" prefix)."""
    rows = list(read_jsonl(path))
    if limit:
        rows = rows[:limit]
    pairs = hide_preferences(rows, seed, heldout=heldout)
    if heldout:
        for p in pairs:
            p.item["item_id"] = ("test-" + p.item["item_id"])[:128]
    return pairs
