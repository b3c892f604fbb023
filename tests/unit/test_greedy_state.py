"""BAL-PM's `GreedyState`, kept current by the occupancy across calls, picks what a fresh greedy picks.

Random histories of leases, labels, releases, expiries and exclusions (consensus labelling
included), with the BALD scores and beta changing between calls: after every event n(x)
equals a recount, and at every check the kept state's batch equals `select_batch` over the
full masks, ids and score components, and the state is left as it was found.
"""

from __future__ import annotations

import numpy as np
import pytest

from balpm_server.acquisition import (
    AcquisitionParams,
    GreedyState,
    Strategy,
    build_knn_graph,
    sample_open,
    select_batch,
)
from balpm_server.domain.occupancy import Occupancy
from balpm_server.errors import FailedPrecondition, InvalidArgument


def _snapshot(state: GreedyState) -> list[np.ndarray]:
    state.flush()
    return [state.count_N.copy(), state.acquired_N.copy(), state.open_N.copy(), state.ent_N.copy(),
            state.tot_N.copy(), state._key.copy(), state._block_max.copy()]


@pytest.mark.parametrize("labels_per_item", [1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_a_kept_state_picks_the_fresh_greedy_batch_over_a_random_history(labels_per_item: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    feats = rng.integers(0, 4, size=(n, 3)).astype(np.float32)  # ties and duplicates in the balls
    in_pool = rng.random(n) < 0.9
    graph = build_knn_graph(feats, 5, member_mask_N=in_pool)
    occ = Occupancy(n, labels_per_item)
    state = GreedyState.standard(graph, acquired_N=occ.masks(in_pool, "x", 0.0)[1], open_N=occ.open_rows(in_pool))
    occ.on_change = state.observe
    annotators = ["ann-a", "ann-b", "ann-c"]
    epi_N = rng.random(n)
    now = 0.0
    pool_rows = np.flatnonzero(in_pool)
    checked = 0
    for step in range(700):
        now += float(rng.random())
        event = rng.integers(0, 7)
        row = int(rng.choice(pool_rows))
        ann = annotators[int(rng.integers(0, len(annotators)))]
        if event <= 1:
            occ.add_lease(row, ann, now + float(rng.random()) * 5)
        elif event == 2:
            occ.add_label(row, ann)
        elif event == 3:
            occ.release(row, ann if rng.random() < 0.7 else "")
        elif event == 4:
            occ.purge_expired(now)
        elif event == 5:
            occ.set_excluded(row, bool(rng.random() < 0.5))
        else:
            epi_N = rng.random(n)  # a new posterior: a new array
        candidate_N, acquired_N = occ.masks(in_pool, ann, now)  # also purges expired leases
        if step % 3:
            continue  # several events (the same row back and forth too) wait for one flush
        np.testing.assert_array_equal(state.counts(), graph.counts_inside(acquired_N), err_msg=f"step {step}")
        np.testing.assert_array_equal(state.open_N, occ.open_rows(in_pool), err_msg=f"step {step}")
        if state._scored_by is not None:  # every kept value is the fresh state's, bit for bit
            fresh_state = GreedyState.standard(graph, acquired_N=acquired_N, open_N=occ.open_rows(in_pool))
            fresh_state.configure(*state._scored_by)
            for got, want in zip(_snapshot(state), _snapshot(fresh_state), strict=True):
                np.testing.assert_array_equal(got, want, err_msg=f"step {step}: kept state drifted")
        if step % 15 or candidate_N.sum() < 8:
            continue
        strategy = Strategy.BALPM if step % 30 else Strategy.ENTROPY_ONLY
        beta = float(rng.choice([0.01, 1.0]))
        params = AcquisitionParams(k=5, beta=beta)
        fresh = select_batch(strategy, batch_size=8, candidate_mask_N=candidate_N, acquired_mask_N=acquired_N,
                             rng=np.random.default_rng(0), params=params, epistemic_N=epi_N, graph=graph)
        state.configure(epi_N if strategy is Strategy.BALPM else None, beta, params.d_ent)
        before = _snapshot(state)
        kept = state.pick(8, occ.own_rows(ann) if labels_per_item > 1 else None)
        assert kept is not None
        np.testing.assert_array_equal(kept.indices_B, fresh.indices_B, err_msg=f"step {step}")
        for got, want in ((kept.total_B, fresh.total_B), (kept.epistemic_B, fresh.epistemic_B),
                          (kept.entropy_B, fresh.entropy_B)):
            np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
        for got, want in zip(_snapshot(state), before, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=f"step {step}: pick changed the state")
        checked += 1
    assert checked >= 20


def test_pick_reports_too_few_open_rows_and_checks_its_inputs() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(100, 4)).astype(np.float32)
    graph = build_knn_graph(feats, 3)
    open_N = np.zeros(100, dtype=bool)
    open_N[:5] = True
    state = GreedyState.standard(graph, acquired_N=np.zeros(100, dtype=bool), open_N=open_N)
    with pytest.raises(FailedPrecondition):
        state.pick(2)  # not configured
    state.configure(None, 0.01, 1.0)
    assert state.pick(6) is None
    batch = state.pick(5)
    assert batch is not None and sorted(batch.indices_B.tolist()) == [0, 1, 2, 3, 4]
    assert state.pick(5, np.array([0])) is None  # closed for this pick only
    assert state.pick(5) is not None
    bad = np.ones(100)
    bad[3] = np.nan
    with pytest.raises(InvalidArgument) as e:
        state.configure(bad, 0.01, 1.0)
    assert e.value.field == "epistemic_N"
    with pytest.raises(InvalidArgument) as e:
        GreedyState.standard(graph, acquired_N=np.zeros(50, dtype=bool), open_N=open_N)
    assert e.value.field == "acquired_mask_N"
    with pytest.raises(InvalidArgument) as e:
        select_batch(Strategy.BALPM, batch_size=2, candidate_mask_N=open_N, acquired_mask_N=~open_N,
                     rng=np.random.default_rng(0), params=AcquisitionParams(k=3), graph=graph,
                     count_N=np.zeros(5, dtype=np.int64))
    assert e.value.field == "count_N"


def test_sample_open_is_uniform_over_the_open_rows_without_replacement() -> None:
    rows_R = np.arange(40, dtype=np.int64)
    open_R = rows_R % 4 != 0  # 30 open rows
    hits = np.zeros(40)
    draws = 6000
    for s in range(draws):
        got = sample_open(np.random.default_rng(s), rows_R, 3, lambda r: open_R[r])
        assert got is not None and len(set(got.tolist())) == 3 and open_R[got].all()
        hits[got] += 1
    expected = draws * 3 / 30
    assert np.abs(hits[open_R] - expected).max() < 5 * np.sqrt(expected)  # ~6 sigma would be a bias
    assert hits[~open_R].sum() == 0
    np.testing.assert_array_equal(sample_open(np.random.default_rng(7), rows_R, 3, lambda r: open_R[r]),
                                  sample_open(np.random.default_rng(7), rows_R, 3, lambda r: open_R[r]))
    assert sample_open(np.random.default_rng(0), rows_R, 3, lambda r: r == 5) is None  # too few open
    assert sample_open(np.random.default_rng(0), rows_R[:0], 1, lambda r: r >= 0) is None
