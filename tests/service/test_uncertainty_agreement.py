"""Predict, Evaluate and AcquireBatch report one epistemic quantity: BALD, from one implementation.

Against a real server: the epistemic term Predict returns for an item equals the BALD
score AcquireBatch ranks it by and the mean epistemic Evaluate reports on it (exactly over
the same batch of rows, and to float32 noise for one item alone); Predict's terms
decompose the predictive entropy (total = aleatoric + epistemic).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from balpm.v1 import balpm_pb2 as pb
from balpm.v1 import balpm_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, synthetic_items

DIM = 8
N_ITEMS, N_LABELS = 40, 12
# Over the same rows in the same batch the three agree exactly; one item at a time only up to
# the float32 matmul's dependence on the batch shape (~1e-9 here).
TOL = 1e-7


def _h(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log1p(-p))


@pytest.fixture
def stub(server: ServerThread) -> Iterator[pb_grpc.BalpmServiceStub]:
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.BalpmServiceStub(ch)


def _trained_pool(stub: pb_grpc.BalpmServiceStub, pool: str) -> tuple[list[str], list[str]]:
    """A client-feature pool with a trained 4-member posterior: (every item id in upload order, the unlabelled)."""
    stub.CreatePool(pb.CreatePoolRequest(pool_id=pool, settings=pb.PoolSettings(
        feature_source=pb.FEATURE_SOURCE_CLIENT, feature_dim=DIM, ensemble_size=4, hidden_sizes=[16], epochs=20)))
    items, truth = synthetic_items(N_ITEMS, DIM, seed=11)
    msgs = [pb.Item(**it) for it in items]
    stub.UploadItems(iter([pb.UploadItemsRequest(header=pb.UploadHeader(pool_id=pool)),
                           pb.UploadItemsRequest(chunk=pb.ItemChunk(items=msgs))]), timeout=60)
    labelled = [it["item_id"] for it in items[:N_LABELS]]
    stub.IngestLabels(pb.IngestLabelsRequest(pool_id=pool, labels=[
        pb.Label(label_id=f"l-{iid}", item_id=iid, preference=pb.PREFERENCE_A if truth[iid] == "A" else pb.PREFERENCE_B)
        for iid in labelled
    ]), timeout=60)
    op = stub.UpdatePosterior(pb.UpdatePosteriorRequest(pool_id=pool, seed=3), timeout=60).operation
    deadline = time.monotonic() + 300
    while not op.done:
        assert time.monotonic() < deadline, "training did not finish"
        time.sleep(0.05)
        op = stub.GetOperation(pb.GetOperationRequest(operation_id=op.operation_id), timeout=60).operation
    assert op.state == pb.Operation.STATE_SUCCEEDED, op.error
    return [it["item_id"] for it in items], [it["item_id"] for it in items[N_LABELS:]]


def test_predict_evaluate_and_acquire_agree_on_every_items_epistemic(stub: pb_grpc.BalpmServiceStub) -> None:
    every, ids = _trained_pool(stub, "agree")
    acquired = stub.AcquireBatch(pb.AcquireBatchRequest(
        pool_id="agree", batch_size=len(ids), strategy=pb.STRATEGY_BALD, annotator_id="ann"), timeout=60)
    bald = {a.item.item_id: a.scores.epistemic for a in acquired.items}
    assert sorted(bald) == sorted(ids)
    # AcquireBatch scores every pool row in one pass; Predict over the same rows matches it exactly.
    predicted = stub.Predict(pb.PredictRequest(pool_id="agree", item_ids=every), timeout=60).predictions
    assert max(p.epistemic for p in predicted) > 1e-4  # the members disagree: the check has teeth
    epistemic = {p.item_id: p.epistemic for p in predicted}
    assert {iid: epistemic[iid] for iid in ids} == bald
    # Evaluate over the same rows: its mean epistemic is exactly the mean of Predict's.
    evaluated = stub.Evaluate(pb.EvaluateRequest(pool_id="agree", items=[
        pb.LabelledItem(item=pb.Item(item_id=iid), preference=pb.PREFERENCE_A) for iid in every]), timeout=60)
    assert evaluated.mean_epistemic == float(np.mean([p.epistemic for p in predicted]))
    for p in predicted:
        evaluated = stub.Evaluate(pb.EvaluateRequest(pool_id="agree", items=[
            pb.LabelledItem(item=pb.Item(item_id=p.item_id), preference=pb.PREFERENCE_A)]), timeout=60)
        assert evaluated.count == 1
        assert p.epistemic == pytest.approx(evaluated.mean_epistemic, rel=0, abs=TOL), p.item_id
        # The decomposition: total (entropy of the mean) = aleatoric + epistemic.
        member = np.asarray(p.member_probs)
        assert p.prob_a == pytest.approx(float(member.mean()), abs=1e-12)
        assert p.aleatoric == pytest.approx(float(np.mean([_h(float(q)) for q in member])), abs=1e-12)
        assert p.aleatoric + p.epistemic == pytest.approx(_h(p.prob_a), abs=1e-12)
