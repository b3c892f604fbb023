"""Server-side featurisation reports progress: `featurized_count` advances group by group.

The extractor is held between groups (each `embed` call waits for the test's go), so the
test sees every intermediate count instead of racing a fast extraction.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np

from balpm import Client
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
