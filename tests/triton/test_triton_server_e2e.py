"""balpm-server configured for Triton: upload featurised by a real tritonserver, train, acquire."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from balpm import Client
from balpm_server.features.transformers_extractor import TransformersExtractor
from balpm_server.storage import FeatureStore
from tests.conftest import ServerThread, make_settings

pytestmark = [pytest.mark.triton, pytest.mark.slow]

WORDS = ["the", "a", "good", "bad", "answer", "question", "helpful", "reply", "human", "model", "yes", "no"]


def triton_settings(triton_server: Any, tmp_path: Path, **overrides: Any) -> Any:
    """Server settings for the test Triton (gRPC URL, model, output, token limit), plus `overrides`."""
    base: dict[str, Any] = {
        "extractor": "triton",
        "triton_url": triton_server.grpc_url,
        "triton_model": triton_server.model_name,
        "triton_output": "MEAN_EMBEDDING",
        "max_length_tokens": triton_server.max_length_tokens,
    }
    return make_settings(tmp_path / "data", **{**base, **overrides})

def test_server_pool_is_featurised_through_triton_and_matches_in_process(triton_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = triton_settings(triton_server, tmp_path)
    server = ServerThread(settings)
    rng = np.random.default_rng(0)
    items = []
    for i in range(40):
        words = lambda n: " ".join(rng.choice(WORDS, size=n))  # noqa: E731
        items.append({"item_id": f"t{i}", "prompt": f"human {words(6)}", "completion_a": f" {words(5)}",
                      "completion_b": f" {words(4)}"})
    truth = {it["item_id"]: "A" if len(it["completion_a"]) > len(it["completion_b"]) else "B" for it in items}
    try:
        with Client(server.target) as c:
            pool = c.create_pool("via-triton", ensemble_size=2, hidden_sizes=[16], epochs=5, knn_k=5)
            assert pool.extractor.startswith("triton:MEAN_EMBEDDING") and pool.settings.feature_dim > 0
            c.upload_items("via-triton", items)
            ready = c.wait_pool_ready("via-triton", timeout_s=180)
            assert ready.featurized_count == 40
            batch = c.acquire("via-triton", batch_size=12, strategy="BALPM", seed=0)
            c.ingest_labels("via-triton", [{"label_id": f"l{a.item.item_id}", "item_id": a.item.item_id,
                                            "preference": truth[a.item.item_id]} for a in batch.items])
            assert c.update_posterior("via-triton", seed=0).result.posterior_version == 1
            again = c.acquire("via-triton", batch_size=5, strategy="BALPM", seed=1)
            assert again.posterior_version == 1 and len(again.items) == 5
            dim = ready.settings.feature_dim
        key = server.running.service.store.pool_key("default", "via-triton")  # the pool's folder name
        assert key is not None
        stored = FeatureStore(Path(settings.data_dir) / "pools" / key / "features", dim)
        local = TransformersExtractor(str(triton_server.model_path), pooling="mean",
                                      max_length_tokens=triton_server.max_length_tokens, device="cpu")
        for kind, texts in (("prompt", [it["prompt"] for it in items]),
                            ("a", [it["prompt"] + it["completion_a"] for it in items])):
            got_N_D = stored.read(kind, 40)
            assert float(np.abs(got_N_D - local.embed_sync(texts)).max()) <= 1e-4
    finally:
        server.stop()


def test_a_triton_outage_is_visible_and_the_featurised_items_keep_serving(triton_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 19 items 1-2: Triton stopped during an incremental upload, then restarted."""
    from balpm.errors import BalpmError, WaitTimeoutError
    from tests.waiting import wait_until

    settings = triton_settings(triton_server, tmp_path, triton_timeout_s=5.0)
    server = ServerThread(settings)
    items = [{"item_id": f"o{i}", "prompt": f"human question {i} about {WORDS[i % len(WORDS)]}",
              "completion_a": " yes", "completion_b": " no"} for i in range(20)]
    old_ids = {f"o{i}" for i in range(8)}
    try:
        with Client(server.target, timeout_s=60) as c:
            c.create_pool("outage", ensemble_size=2, hidden_sizes=[8], epochs=5, knn_k=3, control_fraction=0.0)
            c.upload_items("outage", items[:8])
            c.wait_pool_ready("outage", timeout_s=180)
            first = c.acquire("outage", batch_size=4, strategy="BALPM", seed=0)
            c.ingest_labels("outage", [{"label_id": f"l{x.item.item_id}", "item_id": x.item.item_id,
                                        "preference": "A"} for x in first.items])
            assert c.update_posterior("outage", seed=0).result.posterior_version == 1

            triton_server.server.stop()
            c.upload_items("outage", items[8:])
            paused = wait_until(
                lambda: (p := c.get_pool("outage")).HasField("featurization_pause") and p, 120,
                "GetPool to report the featurisation pause",
            )
            pause = paused.featurization_pause
            assert paused.state == paused.STATE_FEATURIZING and paused.featurized_count == 8
            assert pause.reason == "TRITON_UNAVAILABLE" and pause.attempts >= 1 and pause.message
            assert pause.next_retry_time.ToNanoseconds() > pause.paused_since.ToNanoseconds() > 0
            with pytest.raises(WaitTimeoutError) as e:  # what `balpm pools wait --timeout-s 1` exits with
                c.wait_pool_ready("outage", timeout_s=1)
            assert e.value.metadata["pause_reason"] == "TRITON_UNAVAILABLE"
            assert "TRITON_UNAVAILABLE" in str(e.value)
            assert [p.featurization_pause.reason for p in c.list_pools()] == ["TRITON_UNAVAILABLE"]

            # Triton down: the 8 featurised items stay acquirable, trainable and predictable.
            during = c.acquire("outage", batch_size=3, strategy="BALPM", seed=1)
            assert {x.item.item_id for x in during.items} <= old_ids and during.posterior_version == 1
            c.ingest_labels("outage", [{"label_id": f"l{x.item.item_id}", "item_id": x.item.item_id,
                                        "preference": "B"} for x in during.items])
            assert c.update_posterior("outage", seed=0).result.label_count == 7
            assert len(c.predict("outage", item_ids=sorted(old_ids)).predictions) == 8
            with pytest.raises(BalpmError) as waiting:
                c.predict("outage", item_ids=["o15"])
            assert waiting.value.reason == "ITEM_FEATURIZING"

            triton_server.server.start(ready_timeout_s=180.0)
            ready = c.wait_pool_ready("outage", timeout_s=180)
            assert ready.featurized_count == 20 and not ready.HasField("featurization_pause")
            after = c.acquire("outage", batch_size=13, strategy="BALPM", seed=2)  # every item left
            assert {x.item.item_id for x in after.items} == {it["item_id"] for it in items} - {
                x.item.item_id for x in (*first.items, *during.items)}
    finally:
        if not triton_server.server.is_running():
            triton_server.server.start(ready_timeout_s=180.0)
        server.stop()


def test_start_up_check_reports_a_triton_url_that_points_at_the_http_port(triton_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from balpm_server.features import build_extractor
    from balpm_server.server import check_extractor

    good = triton_settings(triton_server, tmp_path)
    assert asyncio.run(check_extractor(build_extractor(good), good, timeout_s=60))
    http_port = triton_server.http_url.rsplit(":", 1)[1].strip("/")
    wrong = triton_settings(triton_server, tmp_path, triton_url=f"127.0.0.1:{http_port}")
    extractor = build_extractor(wrong)
    assert not asyncio.run(check_extractor(extractor, wrong, timeout_s=60))
    try:
        asyncio.run(extractor.dim())
    except Exception as e:  # the message the operator sees, with the hint
        assert "gRPC port" in str(e), str(e)
    else:
        raise AssertionError("the HTTP port answered a gRPC metadata call")
