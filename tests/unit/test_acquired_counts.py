"""n(x) kept current across calls (`AcquiredCounts`, fed by the occupancy) equals a recount; same batches."""

from __future__ import annotations

import numpy as np
import pytest

from balpm_server.acquisition import AcquiredCounts, AcquisitionParams, Strategy, build_knn_graph, select_batch
from balpm_server.domain.occupancy import Occupancy
from balpm_server.errors import InvalidArgument


@pytest.mark.parametrize("labels_per_item", [1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_counts_follow_a_random_history_of_leases_labels_releases_and_expiries(labels_per_item: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    feats = rng.integers(0, 4, size=(n, 3)).astype(np.float32)  # ties and duplicates in the balls
    in_pool = rng.random(n) < 0.9
    graph = build_knn_graph(feats, 5, member_mask_N=in_pool)
    occ = Occupancy(n, labels_per_item)
    counts = AcquiredCounts(graph, occ.masks(in_pool, "x", 0.0)[1])
    occ.on_acquired = counts.set
    annotators = ["ann-a", "ann-b", "ann-c"]
    now = 0.0
    params = AcquisitionParams(k=5)
    pool_rows = np.flatnonzero(in_pool)
    for step in range(400):
        now += float(rng.random())
        event = rng.integers(0, 5)
        row = int(rng.choice(pool_rows))
        ann = annotators[int(rng.integers(0, len(annotators)))]
        if event == 0:
            occ.add_lease(row, ann, now + float(rng.random()) * 5)
        elif event == 1:
            occ.add_label(row, ann)
        elif event == 2:
            occ.release(row, ann if rng.random() < 0.7 else "")
        elif event == 3:
            occ.purge_expired(now)
        candidate_N, acquired_N = occ.masks(in_pool, ann, now)  # also purges expired leases
        np.testing.assert_array_equal(counts.count_N, graph.counts_inside(acquired_N), err_msg=f"step {step}")
        if step % 40 == 0 and candidate_N.sum() >= 8:
            epi = rng.random(n)
            kwargs = {"batch_size": 8, "candidate_mask_N": candidate_N, "acquired_mask_N": acquired_N,
                      "params": params, "epistemic_N": epi, "graph": graph}
            kept = select_batch(Strategy.BALPM, rng=np.random.default_rng(0), count_N=counts.count_N.copy(), **kwargs)
            recount = select_batch(Strategy.BALPM, rng=np.random.default_rng(0), **kwargs)
            np.testing.assert_array_equal(kept.indices_B, recount.indices_B)
            np.testing.assert_array_equal(kept.total_B, recount.total_B)


def test_counts_are_not_modified_by_a_selection_and_shape_is_checked() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(100, 4)).astype(np.float32)
    graph = build_knn_graph(feats, 3)
    acquired = rng.random(100) < 0.2
    counts = AcquiredCounts(graph, acquired)
    before = counts.count_N.copy()
    select_batch(Strategy.ENTROPY_ONLY, batch_size=10, candidate_mask_N=~acquired, acquired_mask_N=acquired,
                 rng=np.random.default_rng(0), params=AcquisitionParams(k=3), graph=graph, count_N=counts.count_N)
    np.testing.assert_array_equal(counts.count_N, before)
    with pytest.raises(InvalidArgument) as e:
        select_batch(Strategy.BALPM, batch_size=2, candidate_mask_N=~acquired, acquired_mask_N=acquired,
                     rng=np.random.default_rng(0), params=AcquisitionParams(k=3), graph=graph, count_N=before[:5])
    assert e.value.field == "count_N"
    with pytest.raises(InvalidArgument):
        AcquiredCounts(graph, acquired[:50])
