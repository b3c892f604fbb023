"""AcquireBatch's kept-state BAL-PM greedy gives the batches of the full-mask path, call after call.

Two pools with the same items and settings (consensus labelling, a control arm) go through
the same history of acquisitions by several annotators, labels, releases, an exclusion and
a posterior update; one pool is forced onto the general path (`select_batch` over the full
masks) for every call. Every reply must be identical: ids, order, score components, control
flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balpm import Client
from balpm_server.domain.acquiring import Acquisition
from tests.conftest import ServerThread, make_settings, synthetic_items


def test_kept_greedy_state_matches_the_full_mask_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast_calls: list[str] = []
    real_fast = Acquisition._greedy_fast

    async def greedy_fast(rt: Any, *args: Any) -> Any:
        if rt.pool_id.rsplit("+", 1)[0].endswith("slow"):  # storage key: <pool id>+<suffix>
            return None  # the general path, as before the kept state
        batch = await real_fast(rt, *args)
        fast_calls.append("hit" if batch is not None else "miss")
        return batch

    monkeypatch.setattr(Acquisition, "_greedy_fast", staticmethod(greedy_fast))
    srv = ServerThread(make_settings(tmp_path / "data", extractor=""))
    try:
        items, truth = synthetic_items(240, 6, seed=3, n_prompts=120)
        with Client(srv.target, timeout_s=60) as c:
            for pool in ("fast", "slow"):
                c.create_pool(pool, feature_source="CLIENT", feature_dim=6, ensemble_size=2, hidden_sizes=[8],
                              epochs=5, labels_per_item=2, control_fraction=0.25)
                c.upload_items(pool, items)

            def both(fn: Any) -> list[Any]:
                return [fn(pool) for pool in ("fast", "slow")]

            def reply(batch: Any) -> list[tuple[Any, ...]]:
                return [(a.item.item_id, a.rank, a.scores.SerializeToString(), a.control) for a in batch.items]

            step = 0
            for round_ in range(6):
                for ann in ("ann-a", "ann-b", "ann-c"):
                    strategy = "ENTROPY_ONLY" if step % 4 == 3 else "BALPM"
                    got = both(lambda p: c.acquire(p, batch_size=6, strategy=strategy, seed=step,  # noqa: B023
                                                   annotator_id=ann, beta=0.01 + round_))  # noqa: B023
                    assert reply(got[0]) == reply(got[1]), f"step {step}"
                    ids = [a.item.item_id for a in got[0].items]
                    labels = [{"label_id": f"{ann}-{i}", "item_id": i, "preference": truth[i], "annotator_id": ann}
                              for i in ids[:4]]
                    both(lambda p: c.ingest_labels(p, labels))  # noqa: B023
                    both(lambda p: c.release_items(p, ids[4:5], annotator_id=ann))  # noqa: B023
                    step += 1
                if round_ == 1:
                    both(lambda p: c.exclude_items(p, [items[0]["item_id"], items[1]["item_id"]]))
                if round_ == 2:
                    both(lambda p: c.update_posterior(p, seed=0))
        # The first call builds the state (general path); every later one, the posterior update included, keeps it.
        assert fast_calls[0] == "miss" and fast_calls[1:] == ["hit"] * (len(fast_calls) - 1), fast_calls
    finally:
        srv.stop()
