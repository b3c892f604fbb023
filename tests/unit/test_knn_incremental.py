"""The incremental kNN graph: appending rows gives exactly the graph of a fresh build."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from balpm_server.acquisition.knn import KnnGraph, build_knn_graph, can_extend, extend_knn_graph
from balpm_server.errors import InvalidArgument

FIELDS = (
    "radius_N", "ball_indptr", "ball_indices", "reverse_indptr", "reverse_indices", "member_mask_N", "ball_dist",
)


def assert_same_graph(got: KnnGraph, want: KnnGraph) -> None:
    assert (got.k, got.n_items, got.exact, got.standardized) == (want.k, want.n_items, want.exact, want.standardized)
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and np.array_equal(a, b, equal_nan=True), name  # bit for bit


def _features(kind: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gaussian":
        return rng.normal(size=(n, d)).astype(np.float32)
    if kind == "ties":  # a small integer lattice: many exact distance ties and duplicate points
        return rng.integers(0, 3, size=(n, d)).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)  # "duplicates": later rows copy earlier ones
    x[n // 2 :] = x[rng.integers(0, n // 2, n - n // 2)]
    return x


@pytest.mark.parametrize("kind", ["gaussian", "ties", "duplicates"])
@pytest.mark.parametrize("seed", range(4))
def test_appending_equals_a_fresh_build(kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n0, m = int(rng.integers(30, 250)), int(rng.integers(1, 90))
    d, k = int(rng.integers(1, 24)), int(rng.integers(1, 14))
    x = _features(kind, n0 + m, d, rng)
    mask = rng.random(n0 + m) < 0.85  # some held-out rows, old and new
    mask[: k + 1] = True
    old = build_knn_graph(x[:n0], k, member_mask_N=mask[:n0])
    assert can_extend(old, n0 + m, mask)
    assert_same_graph(extend_knn_graph(old, x, mask), build_knn_graph(x, k, member_mask_N=mask))


def test_many_appends_in_a_row_stay_exact() -> None:
    rng = np.random.default_rng(7)
    x = _features("ties", 400, 5, rng)
    mask = np.ones(400, dtype=bool)
    graph = build_knn_graph(x[:60], 13, member_mask_N=mask[:60])
    for end in (61, 100, 101, 250, 400):  # one row, then blocks
        graph = extend_knn_graph(graph, x[:end], mask[:end])
    assert_same_graph(graph, build_knn_graph(x, 13, member_mask_N=mask))


def test_appending_only_held_out_rows_changes_no_ball() -> None:
    rng = np.random.default_rng(3)
    x = _features("gaussian", 80, 6, rng)
    mask = np.r_[np.ones(60, dtype=bool), np.zeros(20, dtype=bool)]
    old = build_knn_graph(x[:60], 5, member_mask_N=mask[:60])
    new = extend_knn_graph(old, x, mask)
    assert_same_graph(new, build_knn_graph(x, 5, member_mask_N=mask))
    assert np.isnan(new.radius_N[60:]).all() and new.n_entries == old.n_entries


def test_a_large_block_of_new_rows_spans_several_gemm_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    from balpm_server.acquisition import knn

    monkeypatch.setattr(knn, "_GEMM_BLOCK_ELEMS", 7 * 300)  # 7 query rows per block
    rng = np.random.default_rng(11)
    x = _features("duplicates", 300, 8, rng)
    mask = np.ones(300, dtype=bool)
    old = build_knn_graph(x[:200], 4, member_mask_N=mask[:200])
    assert_same_graph(extend_knn_graph(old, x, mask), build_knn_graph(x, 4, member_mask_N=mask))


def test_graphs_that_cannot_be_extended_are_refused() -> None:
    rng = np.random.default_rng(5)
    x = _features("gaussian", 120, 4, rng)
    mask = np.ones(120, dtype=bool)
    standardized = build_knn_graph(x[:100], 3, standardize=True, member_mask_N=mask[:100])
    approximate = build_knn_graph(x[:100], 3, exact_threshold=10, member_mask_N=mask[:100])
    exact = build_knn_graph(x[:100], 3, member_mask_N=mask[:100])
    flipped = mask.copy()
    flipped[5] = False  # an old row changed membership
    assert not can_extend(standardized, 120, mask)
    assert not can_extend(approximate, 120, mask)
    assert not can_extend(exact, 120, flipped)
    assert not can_extend(exact, 90, mask[:90])  # rows removed
    assert can_extend(exact, 120, mask)
    with pytest.raises(InvalidArgument) as e:
        extend_knn_graph(standardized, x, mask)
    assert e.value.reason == "GRAPH_NOT_EXTENSIBLE" and e.value.field == "graph"
    bad = x.copy()
    bad[110, 0] = np.nan
    with pytest.raises(InvalidArgument) as e:
        extend_knn_graph(exact, bad, mask)
    assert e.value.field == "prompt_features"


def test_a_graph_saved_without_entry_distances_still_extends_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = _features("ties", 200, 4, rng)
    mask = np.ones(200, dtype=bool)
    old = build_knn_graph(x[:150], 6, member_mask_N=mask[:150])
    assert old.ball_dist is not None and old.ball_dist.shape == old.ball_indices.shape
    old.save(tmp_path / "g.npz")
    assert_same_graph(KnnGraph.load(tmp_path / "g.npz"), old)  # ball_dist round-trips
    legacy = dataclasses.replace(old, ball_dist=None)  # as saved before ball_dist existed
    assert_same_graph(extend_knn_graph(legacy, x, mask), build_knn_graph(x, 6, member_mask_N=mask))


@pytest.mark.parametrize("standardize", [False, True])
def test_float16_features_give_the_graph_of_their_float32_values(
    standardize: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FEATURE_STORAGE_FLOAT16 pool's arrays: every distance is taken in float64 of the same values."""
    import balpm_server.acquisition.knn as knn

    monkeypatch.setattr(knn, "_ADD_ROWS_ELEMS", 7 * 6)  # the FAISS index is fed several float32 chunks
    rng = np.random.default_rng(3)
    x16 = (rng.normal(size=(300, 6)) * 50).astype(np.float16)
    x16[250:] = x16[:50]  # duplicates: ties survive the rounding
    mask = rng.random(300) < 0.9
    want = build_knn_graph(x16.astype(np.float32), 5, standardize=standardize, member_mask_N=mask)
    got = build_knn_graph(x16, 5, standardize=standardize, member_mask_N=mask)
    assert_same_graph(got, want)
    if not standardize:  # extension (exact, unstandardised graphs) upcasts the same way
        old = build_knn_graph(x16[:200], 5, member_mask_N=mask[:200])
        assert_same_graph(extend_knn_graph(old, x16, mask), want)
