"""APL with server-computed log-probabilities from local policy and reference models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from balpm import Client
from balpm_server.features.logprobs import CompletionScorer
from tests.conftest import ServerThread, synthetic_items
from tests.tiny_models import tiny_causal_lm


def test_completion_logprobs_match_a_manual_forward_pass(tmp_path: Path) -> None:
    import torch

    path = tiny_causal_lm(tmp_path / "lm", seed=0)
    scorer = CompletionScorer(path, device="cpu")
    got = scorer.logprobs(["prompt w1 w2", "prompt"], ["w3 w4", "w5"])
    ids = scorer.tokenizer("prompt w1 w2 w3 w4", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(scorer.model(ids).logits[0, :-1], -1)
    manual = float(logp[2, ids[0, 3]] + logp[3, ids[0, 4]])
    assert got[0] == pytest.approx(manual, abs=1e-5)
    assert got[1] < 0


def test_apl_strategies_use_scores_computed_by_the_server(server: ServerThread, client: Client, tmp_path: Path) -> None:
    policy = tiny_causal_lm(tmp_path / "policy", seed=1)
    reference = tiny_causal_lm(tmp_path / "reference", seed=2)
    items, _ = synthetic_items(20, 4, seed=0)
    for i, it in enumerate(items):
        it["prompt"], it["completion_a"], it["completion_b"] = f"prompt w{i}", f"w{i + 1} w{i + 2}", f"w{(i * 7) % 40}"
    client.create_pool(
        "apl",
        feature_source="CLIENT",
        feature_dim=4,
        ensemble_size=2,
        hidden_sizes=[8],
        apl_policy_model_path=policy,
        apl_reference_model_path=reference,
    )
    client.upload_items("apl", items)
    client.wait_pool_ready("apl", timeout_s=120)
    batch = client.acquire("apl", batch_size=5, strategy="APL_CERTAINTY", seed=0)
    totals = [a.scores.total for a in batch.items]
    assert totals == sorted(totals, reverse=True) and all(np.isfinite(totals))
    # Certainty is |r_a - r_b| with r = 0.1 * (log pi - log pi_ref): recompute for the top item.
    top = next(it for it in items if it["item_id"] == batch.items[0].item.item_id)
    pol, ref = CompletionScorer(policy, device="cpu"), CompletionScorer(reference, device="cpu")
    r = [
        0.1 * (pol.logprobs([top["prompt"]], [c])[0] - ref.logprobs([top["prompt"]], [c])[0])
        for c in (top["completion_a"], top["completion_b"])
    ]
    assert totals[0] == pytest.approx(abs(r[0] - r[1]), rel=1e-4)
    hybrid = client.acquire("apl", batch_size=3, strategy="APL_HYBRID", seed=0, apl_entropy_top_s=8)
    assert len(hybrid.items) == 3
