"""A pool whose posterior is a LoRA ensemble on a shared causal LM (tiny GPT-2 built in code)."""

from __future__ import annotations

from pathlib import Path

import pytest

from balpm import Client
from balpm.errors import InvalidArgumentError
from tests.conftest import ServerThread, synthetic_items
from tests.tiny_models import tiny_causal_lm


def test_lora_ensemble_pool_trains_predicts_and_acquires(server: ServerThread, client: Client, tmp_path: Path) -> None:
    backbone = tiny_causal_lm(tmp_path / "backbone", seed=0)
    items, _ = synthetic_items(40, 4, seed=0)
    for i, it in enumerate(items):
        it["prompt"], it["completion_a"], it["completion_b"] = f"prompt w{i % 9}", f" w{i % 7} w1", f" w{i % 5} w2"
    client.create_pool("lora", feature_source="CLIENT", feature_dim=4, ensemble_size=3, epochs=2,
                       posterior_kind="LORA_ENSEMBLE", lora_model_path=backbone, knn_k=3)
    client.upload_items("lora", items)
    first = client.acquire("lora", batch_size=12, strategy="BALPM", seed=0)
    client.ingest_labels("lora", [{"label_id": f"l{k}", "item_id": a.item.item_id, "preference": "AB"[k % 2]}
                                  for k, a in enumerate(first.items)])
    op = client.update_posterior("lora", seed=1)
    assert op.result.posterior_version == 1
    pred = client.predict("lora", item_ids=["it-0", "it-1"])
    members = [list(p.member_probs) for p in pred.predictions]
    assert all(len(m) == 3 for m in members)
    assert any(len({round(x, 6) for x in m}) > 1 for m in members), "adapters should disagree"
    bald = client.acquire("lora", batch_size=5, strategy="BALD", seed=0)
    assert bald.posterior_version == 1 and all(a.scores.epistemic >= 0 for a in bald.items)


def test_lora_pool_needs_a_local_model_folder(client: Client) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        client.create_pool("lora2", feature_source="CLIENT", feature_dim=4, posterior_kind="LORA_ENSEMBLE",
                           lora_model_path="/nonexistent")
    assert e.value.field == "settings.lora_model_path"
