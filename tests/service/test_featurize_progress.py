"""Server-side featurisation reports progress: `featurized_count` advances group by group.

The extractor is held between groups (each `embed` call waits for the test's go), so the
test sees every intermediate count instead of racing a fast extraction.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from balpm import Client
from balpm.errors import BalpmError
from balpm.v1 import balpm_pb2 as pb
from tests.conftest import ServerThread, make_settings
from tests.waiting import wait_until

GROUP = 4  # extract_batch_size: items per extraction group
N_ITEMS = 3 * GROUP


def test_featurized_count_advances_during_extraction(tmp_path: Path) -> None:
    srv = ServerThread(make_settings(tmp_path / "data", extract_batch_size=GROUP))
    extractor = srv.running.service.extractor
    assert extractor is not None
    real_embed = extractor.embed
    go = threading.Semaphore(0)
    calls: list[int] = []

    async def held_embed(texts: list[str]) -> np.ndarray:
        granted = await asyncio.to_thread(go.acquire, True, 60)
        assert granted, "the test never let this extraction group go"
        calls.append(len(texts))
        return await real_embed(texts)

    extractor.embed = held_embed  # type: ignore[method-assign]
    try:
        with Client(srv.target, timeout_s=60) as c:
            c.create_pool("p", ensemble_size=2)
            c.upload_items(
                "p",
                [{"item_id": f"t{i}", "prompt": f"prompt {i}", "completion_a": "yes", "completion_b": "no"}
                 for i in range(N_ITEMS)],
            )
            seen = [c.get_pool("p").featurized_count]
            assert seen == [0]
            for done in range(GROUP, N_ITEMS + 1, GROUP):
                go.release()  # one more group may run
                pool = wait_until(
                    lambda done=done: (p := c.get_pool("p")).featurized_count >= done and p,
                    60, f"featurized_count to reach {done}",
                )
                seen.append(pool.featurized_count)
            assert seen == list(range(0, N_ITEMS + 1, GROUP))
            assert calls == [3 * GROUP] * (N_ITEMS // GROUP)  # prompt, prompt + A, prompt + B per item
            ready = wait_until(lambda: (p := c.get_pool("p")).state == pb.Pool.STATE_READY and p, 60, "READY")
            assert ready.featurized_count == N_ITEMS
    finally:
        for _ in range(N_ITEMS):
            go.release()
        extractor.embed = real_embed  # type: ignore[method-assign]
        srv.stop()


def _acquirable(c: Client, pool: str) -> int:
    """How many items the pool could hand out now (BATCH_LARGER_THAN_POOL names it)."""
    with pytest.raises(BalpmError) as e:
        c.acquire(pool, batch_size=1000, strategy="RANDOM", annotator_id="counter")
    assert e.value.reason == "BATCH_LARGER_THAN_POOL", e.value
    return int(e.value.metadata["acquirable"])


def test_a_pool_keeps_serving_its_featurised_items_while_new_ones_are_extracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19 item 1: an incremental upload no longer blocks AcquireBatch, UpdatePosterior, Predict, Evaluate."""
    srv = ServerThread(make_settings(tmp_path / "data", extract_batch_size=GROUP))
    extractor = srv.running.service.extractor
    assert extractor is not None
    real_embed = extractor.embed
    go = threading.Semaphore(0)

    async def held_embed(texts: list[str]) -> np.ndarray:
        granted = await asyncio.to_thread(go.acquire, True, 60)
        assert granted, "the test never let this extraction group go"
        return await real_embed(texts)

    extractor.embed = held_embed  # type: ignore[method-assign]

    def item(i: int, split: str = "POOL") -> dict[str, object]:
        out: dict[str, object] = {"item_id": f"t{i}", "prompt": f"prompt {i} about {'cats' if i % 2 else 'dogs'}",
                                  "completion_a": f"yes {i}", "completion_b": "no"}
        if split == "HELDOUT":
            out |= {"split": "HELDOUT", "heldout_preference": "A" if i % 2 else "B"}
        return out

    old = [item(i) for i in range(10)] + [item(i, "HELDOUT") for i in (10, 11)]
    new = [item(i) for i in range(12, 20)]  # two groups
    try:
        with Client(srv.target, timeout_s=60) as c:
            c.create_pool("p", ensemble_size=2, hidden_sizes=[8], epochs=5, knn_k=3, control_fraction=0.0)
            c.upload_items("p", old)
            for _ in range(3):
                go.release()
            c.wait_pool_ready("p", timeout_s=60)
            first = c.acquire("p", batch_size=4, strategy="BALPM", seed=0, annotator_id="a")
            c.ingest_labels("p", [{"label_id": f"l-{x.item.item_id}", "item_id": x.item.item_id, "preference": "A"}
                                  for x in first.items])
            assert c.update_posterior("p", seed=0).result.posterior_version == 1

            c.upload_items("p", new)  # extraction held: no new item has its features
            pool = c.get_pool("p")
            assert pool.state == pb.Pool.STATE_FEATURIZING and pool.featurized_count == 12
            assert _acquirable(c, "p") == 6  # the 10 old pool items less the 4 labelled
            batch = c.acquire("p", batch_size=3, strategy="BALPM", seed=1, annotator_id="b")
            assert {x.item.item_id for x in batch.items} <= {f"t{i}" for i in range(10)}
            assert len(c.predict("p", item_ids=["t0", "t5"]).predictions) == 2
            with pytest.raises(BalpmError) as waiting:
                c.predict("p", item_ids=["t15"])
            assert waiting.value.reason == "ITEM_FEATURIZING"
            assert waiting.value.code == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(BalpmError) as missing:
                c.predict("p", item_ids=["nope"])
            assert missing.value.code == grpc.StatusCode.NOT_FOUND
            assert c.evaluate("p").count == 2
            # A label of an item still featurising is stored; training uses it once the item has features.
            c.ingest_labels("p", [{"label_id": "l-t13", "item_id": "t13", "preference": "B"}] +
                                 [{"label_id": f"l-{x.item.item_id}", "item_id": x.item.item_id, "preference": "B"}
                                  for x in batch.items])
            second = c.update_posterior("p", seed=0).result
            assert second.posterior_version == 2 and second.label_count == 7  # 8 stored, t13's waits

            monkeypatch.setattr("balpm_server.domain.runtime.JOIN_INTERVAL_S", 0.0)
            go.release()  # the first new group: t12..t15 join
            wait_until(lambda: c.get_pool("p").featurized_count >= 16, 60, "the first new group")
            joined = wait_until(lambda: (n := _acquirable(c, "p")) == 6 and n, 60, "t12..t15 to join")
            assert joined == 6  # 3 old left + t12, t14, t15 (t13 is labelled)
            assert c.get_pool("p").state == pb.Pool.STATE_FEATURIZING
            assert len(c.predict("p", item_ids=["t15"]).predictions) == 1
            go.release()
            wait_until(lambda: c.get_pool("p").state == pb.Pool.STATE_READY, 60, "READY")
            assert _acquirable(c, "p") == 10
            third = c.update_posterior("p", seed=0).result
            assert third.label_count == 8  # t13's label joined with its item
            balpm = c.acquire("p", batch_size=10, strategy="BALPM", seed=2, annotator_id="c")
            assert {x.item.item_id for x in balpm.items} >= {f"t{i}" for i in range(16, 20)}
    finally:
        for _ in range(8):
            go.release()
        extractor.embed = real_embed  # type: ignore[method-assign]
        srv.stop()
