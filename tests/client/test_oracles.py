"""The model oracle gets its features from the server (ExportItems), never from an in-process extractor."""

from __future__ import annotations

import numpy as np

from balpm import Client
from balpm.data import demo_rows, hide_preferences
from balpm.oracles import extract_features, prepare_oracle
from tests.procserver import ProcServer


def test_extract_features_asks_the_server_and_cleans_up(real_server: ProcServer, pool_id: str) -> None:
    pairs = hide_preferences(demo_rows(24, seed=11), seed=11)
    with Client(real_server.target, timeout_s=120) as c:
        feats, info = extract_features(c, pairs, pool_id=pool_id, keep_pool=True)
        assert len(feats) == 24 and feats.prompt_N_D.shape == (24, 384) and feats.a_N_D.dtype == np.float32
        assert info["items"] == 24 and info["feature_dim"] == 384 and info["extractor"].startswith("transformers")
        # exactly the vectors the SERVER pool holds, in the pairs' order
        stored = {it.item_id: it for it in c.export_items(pool_id, include_features=True)}
        for i in (0, 7, 23):
            np.testing.assert_array_equal(feats.b_N_D[i], np.float32(stored[f"x{i}"].completion_b_features))
        assert not np.allclose(feats.a_N_D, feats.b_N_D)
        c.delete_pool(pool_id)

        again, info2 = extract_features(c, pairs[:5])  # the server's cache answers; the pool is removed
        np.testing.assert_array_equal(again.prompt_N_D, feats.prompt_N_D[:5])
        assert info2["pool_id"] not in [p.pool_id for p in c.list_pools()]

        pool, test = pairs[:16], hide_preferences(demo_rows(8, seed=12), seed=12, heldout=True)
        data = prepare_oracle(pool, test, "model", redundancy=2, client=c, teacher_seed=1, label_seed=2)
    assert data.feature_source == "CLIENT" and len(data.pool) == 32 and len(data.test) == 8
    assert all(len(p.item["prompt_features"]) == 384 and p.preference in ("A", "B") for p in data.pool)
    assert all(p.item["heldout_preference"] == p.preference for p in data.test)
    assert 0.5 < data.info["agreement_expected"] < 1
