"""The whole active-learning loop over gRPC against a real server on loopback."""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from balpm import Client
from balpm.data import demo_rows, hide_preferences
from balpm.errors import BalpmError
from balpm.v1 import balpm_pb2 as pb
from tests.conftest import ServerThread, synthetic_items

# Storage paths: every test runs on SQLite and on PostgreSQL + S3 (tests/conftest.py).
pytestmark = pytest.mark.storage_matrix

SMALL = {"ensemble_size": 3, "hidden_sizes": [64], "epochs": 60}


def _label(client: Client, pool: str, batch: pb.AcquireBatchResponse, truth: dict[str, str], tag: str) -> None:
    client.ingest_labels(
        pool,
        [
            {
                "label_id": f"{tag}-{a.item.item_id}",
                "item_id": a.item.item_id,
                "preference": truth[a.item.item_id],
                "annotator_id": "ann-1",
            }
            for a in batch.items
        ],
    )


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="balpm.v1.BalpmService"))
        return resp.status == health_pb2.HealthCheckResponse.SERVING


def test_core_loop_with_client_features(server: ServerThread, client: Client) -> None:
    everything, truth = synthetic_items(420, 16, seed=1)
    items, heldout = everything[:300], everything[300:]
    for it in heldout:
        it["split"] = "HELDOUT"
        it["heldout_preference"] = truth[it["item_id"]]
    client.create_pool("client-pool", feature_source="CLIENT", feature_dim=16, **SMALL)
    up = client.upload_items("client-pool", items + heldout, chunk_size=64)
    assert (up.accepted_count, up.duplicate_count, len(up.rejections)) == (420, 0, 0)
    assert up.pool.item_count == 300 and up.pool.heldout_count == 120

    cold = client.acquire("client-pool", batch_size=40, strategy="BALPM", seed=3)
    assert cold.posterior_version == 0
    assert sum(a.control for a in cold.items) == 4  # control_fraction 0.1 of 40: drawn at random, not by BAL-PM
    assert all(a.scores.epistemic == 0.0 and math.isfinite(a.scores.entropy) for a in cold.items if not a.control)
    _label(client, "client-pool", cold, truth, "r0")

    op = client.update_posterior("client-pool", seed=7)
    assert op.state == pb.Operation.STATE_SUCCEEDED and op.result.posterior_version == 1
    assert op.result.label_count == 40 and op.progress.epoch >= 1

    warm = client.acquire("client-pool", batch_size=60, strategy="BALPM", seed=4)
    assert warm.posterior_version == 1
    assert {a.item.item_id for a in warm.items}.isdisjoint({a.item.item_id for a in cold.items})
    assert any(a.scores.epistemic > 0 for a in warm.items)
    assert [a.control for a in warm.items] == [False] * 54 + [True] * 6  # the control draws come last
    for a in warm.items:
        if a.control:  # no entropy term: their score is their BALD
            assert math.isnan(a.scores.entropy) and a.scores.total == a.scores.epistemic
        else:
            assert a.scores.total == pytest.approx(a.scores.epistemic + 0.01 * a.scores.entropy, abs=1e-9)
    _label(client, "client-pool", warm, truth, "r1")
    client.update_posterior("client-pool", seed=8)

    ev = client.evaluate("client-pool")
    assert ev.count == 120 and ev.posterior_version == 2
    assert ev.accuracy > 0.7, ev
    assert ev.log_likelihood > math.log(0.5)
    pred = client.predict("client-pool", item_ids=["it-0", "it-1"])
    assert [p.item_id for p in pred.predictions] == ["it-0", "it-1"]
    for p in pred.predictions:
        assert 0.0 < p.prob_a < 1.0 and len(p.member_probs) == 3 and p.epistemic >= 0 and p.aleatoric >= 0
    bald = client.acquire("client-pool", batch_size=10, strategy="BALD", seed=1)
    scores = [a.scores.epistemic for a in bald.items]
    assert scores == sorted(scores, reverse=True)
    rnd = client.acquire("client-pool", batch_size=10, strategy="RANDOM", seed=1)
    assert len(rnd.items) == 10
    pool = client.get_pool("client-pool")
    assert pool.label_count == 100 and pool.posterior_version == 2 and pool.leased_item_count == 20


def test_core_loop_with_embedded_extractor(server: ServerThread, client: Client) -> None:
    pairs = hide_preferences(demo_rows(60, seed=5), seed=5)
    test = hide_preferences(demo_rows(20, seed=6), seed=6, heldout=True)
    for p in test:
        p.item["item_id"] = "t-" + p.item["item_id"]
    created = client.create_pool("text-pool", **SMALL)
    assert created.settings.feature_dim == 384 and created.extractor.startswith("transformers")
    client.upload_items("text-pool", [p.item for p in pairs] + [p.item for p in test])
    pool = client.wait_pool_ready("text-pool", timeout_s=300)
    assert pool.featurized_count == 80
    truth = {p.item["item_id"]: p.preference for p in pairs}
    batch = client.acquire("text-pool", batch_size=30, strategy="BALPM", seed=0)
    _label(client, "text-pool", batch, truth, "r0")
    client.update_posterior("text-pool", seed=0)
    again = client.acquire("text-pool", batch_size=10, strategy="BALPM", seed=0)
    assert again.posterior_version == 1
    ev = client.evaluate("text-pool")
    assert ev.count == 20 and math.isfinite(ev.log_likelihood) and 0 <= ev.ece <= 1
    ad_hoc = client.predict(
        "text-pool",
        items=[
            {
                "item_id": "new",
                "prompt": "\n\nHuman: help with coffee?\n\nAssistant:",
                "completion_a": " Sure, here is how.",
                "completion_b": " No.",
            }
        ],
    )
    assert ad_hoc.predictions[0].item_id == "new" and 0 < ad_hoc.predictions[0].prob_a < 1


def test_server_keeps_serving_after_bad_requests(server: ServerThread, client: Client) -> None:
    from balpm.errors import (
        AlreadyExistsError,
        FailedPreconditionError,
        InvalidArgumentError,
        NotFoundError,
    )

    items, _ = synthetic_items(30, 4, seed=3)
    client.create_pool("p", feature_source="CLIENT", feature_dim=4, **SMALL)
    client.upload_items("p", items)

    with pytest.raises(NotFoundError) as e:
        client.get_pool("nope")
    assert e.value.field == "pool_id" and e.value.reason == "POOL_NOT_FOUND"
    with pytest.raises(NotFoundError):
        client.acquire("nope", batch_size=1)
    with pytest.raises(AlreadyExistsError) as e:
        client.create_pool("p", feature_source="CLIENT", feature_dim=4)
    assert e.value.field == "pool_id"

    bad = dict(items[0], item_id="bad-dim", prompt_features=[1.0, 2.0])
    nan = dict(items[0], item_id="bad-nan", completion_a_features=[float("nan")] * 4)
    up = client.upload_items("p", [bad, nan])
    assert up.accepted_count == 0
    assert {(r.id, r.reason) for r in up.rejections} == {("bad-dim", "WRONG_DIMENSION"), ("bad-nan", "NOT_FINITE")}
    assert up.rejections[0].field.endswith("prompt_features")

    with pytest.raises(InvalidArgumentError) as e:
        client.ingest_labels("p", [])
    assert e.value.field == "labels"
    with pytest.raises(NotFoundError) as e:
        client.ingest_labels("p", [{"label_id": "l1", "item_id": "ghost", "preference": "A"}])
    assert e.value.field == "labels[0].item_id"
    with pytest.raises(InvalidArgumentError) as e:
        client.ingest_labels("p", [{"label_id": "l1", "item_id": "it-0", "preference": 0}])
    assert e.value.field == "labels[0].preference"
    with pytest.raises(FailedPreconditionError) as e:
        client.acquire("p", batch_size=31)
    assert e.value.field == "batch_size"
    with pytest.raises(InvalidArgumentError) as e:
        client.acquire("p", batch_size=0)
    assert e.value.field == "batch_size"
    with pytest.raises(InvalidArgumentError) as e:
        client.acquire("p", batch_size=1, strategy=99)
    assert e.value.field == "strategy"
    with pytest.raises(FailedPreconditionError) as e:
        client.acquire("p", batch_size=1, strategy="BALD")
    assert e.value.reason == "NO_POSTERIOR"
    with pytest.raises(FailedPreconditionError) as e:
        client.update_posterior("p")
    assert e.value.reason == "NOT_ENOUGH_LABELS"
    with pytest.raises(InvalidArgumentError) as e:
        client.create_pool("bad/../id", feature_source="CLIENT", feature_dim=4)
    assert e.value.field == "pool_id"

    # A tie is stored deliberately (target 0.5); nothing acknowledged was lost.
    tie = client.ingest_labels("p", [{"label_id": "tie-1", "item_id": "it-1", "preference": "TIE"}])
    assert tie.stored_count == 1
    assert client.get_pool("p").label_count == 1
    assert _serving(server.target)


def test_labels_are_idempotent_and_conflicts_are_reported(server: ServerThread, client: Client) -> None:
    from balpm.errors import AlreadyExistsError

    items, _ = synthetic_items(10, 4, seed=4)
    client.create_pool("idem", feature_source="CLIENT", feature_dim=4, **SMALL)
    client.upload_items("idem", items)
    labels = [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": "A", "annotator_id": "x"} for i in range(5)]
    first = client.ingest_labels("idem", labels)
    again = client.ingest_labels("idem", labels)
    assert (first.stored_count, first.duplicate_count) == (5, 0)
    assert (again.stored_count, again.duplicate_count, again.label_count) == (0, 5, 5)
    with pytest.raises(AlreadyExistsError) as e:
        client.ingest_labels("idem", [dict(labels[0], preference="B")])
    assert e.value.metadata["stored_preference"] == "A" and e.value.field == "labels[0].label_id"
    assert client.upload_items("idem", items).duplicate_count == 10
    assert len(list(client.export_labels("idem", page_size=2))) == 5


def test_concurrent_annotators_never_get_the_same_item(server: ServerThread, client: Client) -> None:
    items, _ = synthetic_items(40, 4, seed=5)
    client.create_pool("lease", feature_source="CLIENT", feature_dim=4, knn_k=3, **SMALL)
    client.upload_items("lease", items)
    a = client.acquire("lease", batch_size=15, strategy="BALPM", annotator_id="alice")
    b = client.acquire("lease", batch_size=15, strategy="BALPM", annotator_id="bob")
    ids_a = {x.item.item_id for x in a.items}
    ids_b = {x.item.item_id for x in b.items}
    assert len(ids_a) == 15 and len(ids_b) == 15 and ids_a.isdisjoint(ids_b)
    released = client.release_items("lease", sorted(ids_a), annotator_id="alice")
    assert released == 15
    c = client.acquire("lease", batch_size=25, strategy="RANDOM", annotator_id="carol")
    assert {x.item.item_id for x in c.items}.isdisjoint(ids_b)


def test_abandoned_watch_streams_do_not_crash_the_server(server: ServerThread, client: Client) -> None:
    items, truth = synthetic_items(40, 4, seed=9)
    client.create_pool("watch", feature_source="CLIENT", feature_dim=4, ensemble_size=2, hidden_sizes=[8],
                       epochs=400)
    client.upload_items("watch", items)
    client.ingest_labels("watch", [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]}
                                   for i in range(40)])
    op = client.update_posterior("watch", seed=0, wait=False)
    for _ in range(30):  # read one progress message, then walk away mid-stream
        stream = client.stub.WatchOperation(pb.WatchOperationRequest(operation_id=op.operation_id))
        next(iter(stream))
        stream.cancel()
    client.wait_operation(op.operation_id)
    assert _serving(server.target)


def test_training_is_exclusive_cancellable_and_can_warm_start(server: ServerThread, client: Client) -> None:
    from balpm.errors import AbortedError, BalpmError

    items, truth = synthetic_items(120, 8, seed=11)
    client.create_pool("ops", feature_source="CLIENT", feature_dim=8, ensemble_size=2, hidden_sizes=[256, 64],
                       epochs=10_000)
    client.upload_items("ops", items)
    client.ingest_labels("ops", [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]}
                                 for i in range(120)])
    running = client.update_posterior("ops", seed=0, wait=False)
    with pytest.raises(AbortedError) as e:
        client.update_posterior("ops", seed=1, wait=False)
    assert e.value.reason == "TRAINING_IN_PROGRESS" and e.value.metadata["operation_id"] == running.operation_id
    client.cancel_operation(running.operation_id)
    with pytest.raises(BalpmError) as cancelled:
        client.wait_operation(running.operation_id, timeout_s=60)
    assert cancelled.value.reason == "OPERATION_STATE_CANCELLED"
    assert client.get_operation(running.operation_id).state == pb.Operation.STATE_CANCELLED
    assert client.get_pool("ops").posterior_version == 0

    first = client.update_posterior("ops", seed=2, epochs=5)
    warm = client.update_posterior("ops", seed=3, epochs=2, warm_start=True)
    assert (first.result.posterior_version, warm.result.posterior_version) == (1, 2)
    assert client.predict("ops", item_ids=["it-0"]).posterior_version == 2


def test_nul_characters_are_refused_with_the_field_named(server: ServerThread, client: Client) -> None:
    """No database stores U+0000 in text (PostgreSQL refuses it): every backend answers INVALID_ARGUMENT."""
    client.create_pool("nul", feature_source="CLIENT", feature_dim=4)
    with pytest.raises(BalpmError) as info:
        client.ingest_labels("nul", [{"label_id": "ok", "item_id": "a", "preference": "A"},
                                     {"label_id": "bad\x00id", "item_id": "a", "preference": "A"}])
    assert info.value.code.name == "INVALID_ARGUMENT" and info.value.reason == "NUL_CHARACTER"
    assert [v.field for v in info.value.field_violations] == ["labels[1].label_id"]
    with pytest.raises(BalpmError) as info:
        client.get_operation("op\x00")
    assert info.value.reason == "NUL_CHARACTER"
    assert client.get_pool("nul").label_count == 0  # the server keeps serving
