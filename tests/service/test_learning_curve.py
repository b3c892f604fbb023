"""GetLearningCurve through gRPC: cross-fitted curves from control labels, the estimate's rules, the CLI view."""

from __future__ import annotations

import numpy as np
import pytest

from balpm import Client
from balpm.v1 import balpm_pb2 as pb
from tests.conftest import synthetic_items

SMALL = {"ensemble_size": 2, "hidden_sizes": [16], "epochs": 15}


def _rounds(client: Client, pool: str, truth: dict[str, str], rounds: int, batch: int) -> None:
    for r in range(rounds):
        got = client.acquire(pool, batch_size=batch, strategy="BALD" if r else "RANDOM", seed=r, annotator_id="a")
        client.ingest_labels(pool, [{"label_id": f"{pool}-{a.item.item_id}", "item_id": a.item.item_id,
                                     "preference": truth[a.item.item_id], "annotator_id": "a"} for a in got.items])
        client.update_posterior(pool, seed=r)


def test_curves_are_cross_fitted_on_control_labels_and_the_estimate_follows_its_rules(client: Client) -> None:
    items, truth = synthetic_items(700, 8, seed=13)
    client.create_pool("lc", feature_source="CLIENT", feature_dim=8, control_fraction=0.5, **SMALL)
    client.upload_items("lc", items)
    first = client.learning_curve("lc")
    assert first.computing or first.label_count == 0
    _rounds(client, "lc", truth, rounds=4, batch=60)

    resp = client.learning_curve("lc", wait=True, timeout_s=300)
    assert not resp.computing and not resp.error and resp.label_count == 240
    assert resp.HasField("compute_time")
    exported = list(client.export_labels("lc"))  # storage order, as the estimate reads them
    control_L = np.array([lb.control for lb in exported])
    assert resp.control_label_count == int(control_L.sum()) == 120
    # Every version is evaluated only on control labels stored after the ones it trained on.
    assert [p.posterior_version for p in resp.active] == [1, 2, 3]  # version 4 has none after it
    for p in resp.active:
        assert p.eval_count == int(control_L[p.label_count:].sum())
        assert p.label_count == 60 * p.posterior_version
        assert -1.0 < p.log_likelihood < 0.0 and 0.0 <= p.accuracy <= 1.0
    # The random-only learner: control labels only, 5 folds, at half and at all the training folds' labels.
    assert [p.posterior_version for p in resp.random] == [0, 0]
    assert [p.label_count for p in resp.random] == [48, 96]
    assert all(p.eval_count == 120 for p in resp.random)  # each control label evaluated once, out of fold
    stopping = resp.stopping
    assert stopping.estimable and stopping.threshold_per_1k_labels == pytest.approx(0.005)
    assert stopping.recommendation != pb.StoppingSignal.RECOMMENDATION_UNSPECIFIED
    assert stopping.slope_low <= stopping.slope_per_1k_labels <= stopping.slope_high
    assert stopping.expected_information_gain > 0
    sv = resp.savings
    if sv.estimable:
        assert sv.labels_saved_share_low <= sv.labels_saved_share <= sv.labels_saved_share_high
        assert sv.random_label_count == 96 and 0 < sv.active_label_count <= 240
    else:
        assert sv.reason.startswith("not estimable yet")
    from balpm._output import learning_curve as view

    text = view(resp)  # what `balpm curve lc` prints
    print(text)
    assert "savings" in text and "stopping" in text and "HELD-OUT LL" in text and "120 control" in text
    again = client.learning_curve("lc")  # nothing changed: the same estimate, nothing recomputed
    assert not again.computing and again.active == resp.active and again.savings == resp.savings


def test_without_control_labels_nothing_is_estimable(client: Client) -> None:
    items, truth = synthetic_items(200, 8, seed=2)
    client.create_pool("noctl", feature_source="CLIENT", feature_dim=8, control_fraction=0.0, **SMALL)
    client.upload_items("noctl", items)
    _rounds(client, "noctl", truth, rounds=1, batch=40)
    resp = client.learning_curve("noctl", wait=True, timeout_s=120)
    assert resp.control_label_count == 0 and not resp.active and not resp.random
    assert not resp.savings.estimable and resp.savings.control_labels_needed == 50
    assert "needs 50" in resp.savings.reason
    assert not resp.stopping.estimable and "needs 3" in resp.stopping.reason


def test_a_version_is_never_evaluated_on_a_prompt_it_trained_on(client: Client) -> None:
    """Several comparisons per prompt (labels of copies are correlated): evaluation skips every prompt a version saw.

    Found by bench/savings_coverage.py: with 4 comparisons per prompt, item-level cross-fitting
    evaluated the random-only learner on other comparisons of prompts it trained on and put its
    held-out LL 0.04-0.15 nats above the truth.
    """
    items, truth = synthetic_items(600, 8, seed=4, n_prompts=150)  # 4 comparisons of each prompt
    client.create_pool("grouped", feature_source="CLIENT", feature_dim=8, control_fraction=0.5, **SMALL)
    client.upload_items("grouped", items)
    _rounds(client, "grouped", truth, rounds=4, batch=60)
    resp = client.learning_curve("grouped", wait=True, timeout_s=300)
    assert not resp.error
    exported = list(client.export_labels("grouped"))  # storage order
    prompt_L = [lb.item.prompt for lb in exported]
    control_L = [lb.control for lb in exported]
    assert resp.active, "no version could be evaluated"
    for p in resp.active:
        seen = set(prompt_L[: p.label_count])
        fresh = sum(c and prompt not in seen for c, prompt in zip(control_L[p.label_count:],
                                                                    prompt_L[p.label_count:], strict=True))
        later = sum(control_L[p.label_count:])
        assert p.eval_count == fresh < later, (p.posterior_version, p.eval_count, fresh, later)
    # The random-only learner's folds keep a prompt's labels together; each control label is held out once.
    assert [pt.eval_count for pt in resp.random] == [sum(control_L)] * 2
