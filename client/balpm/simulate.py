"""Oracle replay: run the active-learning loop against a server with labels from a file.

The pool is uploaded without its labels; each round acquires a batch, reveals the
file's labels for exactly those items (the oracle), retrains and evaluates on the
held-out test items. One JSON line per round. Part of the `balpm[sim]` extra.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from balpm.client import Client
from balpm.data import HiddenPair, hide_preferences, read_jsonl
from balpm.errors import InvalidInputError
from balpm.progress import Bar, bar


@dataclass(frozen=True)
class SimulationConfig:
    """Options of one simulated run.

    Attributes:
        strategy: Strategy of rounds 1..rounds.
        initial: Size of round 0's batch.
        batch_size: Size of the later batches.
        rounds: Acquisition rounds after the initial batch.
        seed: Seed of acquisition and training (round r uses seed * 1000 + r).
        epochs: Max epochs per posterior update (0 = the pool's setting).
        pool_id: Pool id ("" = generated).
        feature_source: "SERVER" (the server extracts features) or "CLIENT" (items carry vectors).
        initial_strategy: Strategy of round 0 (RANDOM: the same initial set for every strategy of a seed).
        keep_pool: Keep the pool after the run.
        pool_settings: Extra PoolSettings fields (knn_k, beta, ensemble_size, hidden_sizes, ...).
        acquire_options: StrategyOptions of every AcquireBatch (beta, d_ent, temperature).
        tags: Extra key/values copied into every round record (oracle, redundancy, ...).
    """

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
    acquire_options: tuple[tuple[str, float], ...] = ()
    tags: tuple[tuple[str, Any], ...] = ()


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
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run the loop and return one record per round.

    Args:
        client: Connected SDK client.
        pool: Pool items with their hidden preferences.
        test: Held-out items with their preferences.
        config: Strategy, sizes and seed.
        out: Stream for JSON lines (one per round), flushed after each.
        oracle: Maps an item to its label ("A", "B" or "TIE"); default reveals the file's.
        progress: Progress bars on stderr (upload, featurisation, rounds); without, a featurisation line
            every 10 s and a line per round.

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
        n_items = len(pool) + len(test)
        with bar(n_items, f"upload {pool_id}", "item", enabled=progress) as b:
            summary = client.upload_items(pool_id, [p.item for p in pool] + [p.item for p in test], progress=b.set)
        if summary.rejections:
            _log(f"{len(summary.rejections)} items rejected, first: {summary.rejections[0].message}")
        with (bar if progress else Bar)(n_items, "featurise", "item") as b:
            client.wait_pool_ready(pool_id, progress=lambda p: b.set(int(p.featurized_count)))
        _log(f"pool {pool_id}: {len(pool)} pool + {len(test)} test items ready in {time.perf_counter() - t0:.1f} s")
        with bar(config.rounds + 1, f"{config.strategy} rounds", "round", enabled=progress) as rounds_bar:
            log = rounds_bar.write if progress else _log
            return _rounds(client, pool_id, by_id, config, reveal, out, rounds_bar, log)
    finally:
        if not config.keep_pool:
            client.delete_pool(pool_id)


def _rounds(
    client: Client,
    pool_id: str,
    by_id: dict[str, HiddenPair],
    config: SimulationConfig,
    reveal: Callable[[HiddenPair], str],
    out: TextIO | None,
    rounds_bar: Bar,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Round 0 (the initial batch) and the acquisition rounds; one record each."""
    records: list[dict[str, Any]] = []
    n_labels = 0
    for rnd in range(config.rounds + 1):
        size = config.initial if rnd == 0 else config.batch_size
        strategy = config.initial_strategy if rnd == 0 else config.strategy
        t_acq = time.perf_counter()
        batch = client.acquire(
            pool_id,
            batch_size=size,
            strategy=strategy,
            seed=config.seed * 1000 + rnd,
            annotator_id="oracle",
            **dict(config.acquire_options),
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
        record = {
            **dict(config.tags),
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
            **batch_stats(batch, by_id),
        }
        records.append(record)
        if out is not None:
            out.write(json.dumps(record) + "\n")
            out.flush()
        log(
            f"round {rnd}: {n_labels} labels, test LL {ev.log_likelihood:.4f}, acc {ev.accuracy:.3f}, "
            f"ECE {ev.ece:.3f} (acquire {acquire_s:.2f} s, train {train_s:.1f} s)"
        )
        rounds_bar.postfix = f"{n_labels} labels, test LL {ev.log_likelihood:.4f}"
        rounds_bar.update()
    return records


def batch_stats(batch: Any, by_id: dict[str, HiddenPair]) -> dict[str, Any]:
    """Per-batch diagnostics from an AcquireBatch response.

    Args:
        batch: The AcquireBatchResponse.
        by_id: Pool items by id (for their prompt text).

    Returns:
        batch_size; distinct_prompts (distinct prompt texts in the batch); mean/min/max of
        the per-item `scores.epistemic` (BALD mutual information at pick time) and of the
        raw KSG `scores.entropy` term (NaN where the strategy has none); mean total score.
    """
    epi = [a.scores.epistemic for a in batch.items]
    ent = [a.scores.entropy for a in batch.items]
    tot = [a.scores.total for a in batch.items]
    n = max(1, len(epi))
    finite_ent = [e for e in ent if math.isfinite(e)]
    return {
        "batch_size": len(epi),
        "distinct_prompts": len({by_id[a.item.item_id].item["prompt"] for a in batch.items}),
        "mean_epistemic": sum(epi) / n,
        "min_epistemic": min(epi, default=0.0),
        "max_epistemic": max(epi, default=0.0),
        "mean_entropy": sum(finite_ent) / len(finite_ent) if finite_ent else None,
        "min_entropy": min(finite_ent) if finite_ent else None,
        "max_entropy": max(finite_ent) if finite_ent else None,
        "mean_total": sum(tot) / n,
    }


def load_split(
    path: str | Path, seed: int, *, heldout: bool, limit: int = 0, rows: tuple[int, int] | None = None
) -> list[HiddenPair]:
    """Read a file in the shared format and hide its preferences (held-out ids get a "test-" prefix).

    Args:
        path: JSONL(.gz) file.
        seed: Seed of the A/B order.
        heldout: Mark the items as held-out (evaluation) items carrying their preference.
        limit: Keep only the first N rows (0 = all); applied after `rows`.
        rows: Half-open row range [start, stop) of the file to use (None = all), e.g. to
            hold out part of one file as a validation or test split.

    Returns:
        The items with their hidden preferences.
    """
    data = list(read_jsonl(path))
    if rows is not None:
        data = data[rows[0] : rows[1]]
    if limit:
        data = data[:limit]
    pairs = hide_preferences(data, seed, heldout=heldout)
    if heldout:
        for p in pairs:
            p.item["item_id"] = ("test-" + p.item["item_id"])[:128]
    return pairs


def parse_rows(spec: str) -> tuple[int, int] | None:
    """Parse a row range "START:STOP" (either side may be empty; "" = all rows).

    Raises:
        balpm.errors.InvalidInputError: Not of that form.
    """
    if not spec:
        return None
    start, sep, stop = spec.partition(":")
    try:
        if not sep:
            raise ValueError("no ':'")
        return int(start or 0), int(stop) if stop else 1 << 62
    except ValueError as e:
        raise InvalidInputError.local(f"row range {spec!r} is not START:STOP ({e})", field="rows") from e
