"""Uploading more items to a pool extends its kNN graph instead of rebuilding it (same graph, same batches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from balpm import Client
from balpm_server.acquisition.knn import KnnGraph
from balpm_server.domain import runtime
from balpm_server.domain.common import DEFAULT_TENANT
from tests.conftest import ServerThread, make_settings, synthetic_items
from tests.unit.test_knn_incremental import assert_same_graph


def test_appended_items_extend_the_graph_to_what_a_rebuild_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[int] = []
    extends: list[tuple[int, int]] = []
    real_build, real_extend = runtime.build_knn_graph, runtime.extend_knn_graph

    def counted_build(feats: np.ndarray, k: int, **kw: Any) -> KnnGraph:
        builds.append(len(feats))
        return real_build(feats, k, **kw)

    def counted_extend(graph: KnnGraph, feats: np.ndarray, mask: np.ndarray) -> KnnGraph:
        extends.append((graph.n_items, len(feats)))
        return real_extend(graph, feats, mask)

    monkeypatch.setattr(runtime, "build_knn_graph", counted_build)
    monkeypatch.setattr(runtime, "extend_knn_graph", counted_extend)
    srv = ServerThread(make_settings(tmp_path / "data", extractor=""))
    try:
        items, _ = synthetic_items(260, 6, seed=1, n_prompts=90)  # repeated prompts: duplicate points
        with Client(srv.target, timeout_s=60) as c:
            c.create_pool("p", feature_source="CLIENT", feature_dim=6, ensemble_size=2, hidden_sizes=[8])
            c.upload_items("p", items[:200])
            first = c.acquire("p", batch_size=8, strategy="BALPM", seed=0)
            assert builds == [200] and extends == []
            c.upload_items("p", items[200:])
            second = c.acquire("p", batch_size=8, strategy="BALPM", seed=0)
            assert builds == [200] and extends == [(200, 260)]  # extended, not rebuilt
            assert len(first.items) == len(second.items) == 8
        svc = srv.running.service
        info = srv.call(svc._pools.require(DEFAULT_TENANT, "p"))
        graph = svc._cache.runtime(info.key).graph
        assert graph is not None and graph.n_items == 260
        feats = np.array([it["prompt_features"] for it in items], dtype=np.float32)
        assert_same_graph(graph, real_build(feats, graph.k, member_mask_N=np.ones(260, dtype=bool)))
    finally:
        srv.stop()
