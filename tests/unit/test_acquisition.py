"""Acquisition engine: every strategy against a direct transcription of its definition."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import digamma

from balpm_server.acquisition import (
    AcquisitionParams,
    AplInputs,
    KnnGraph,
    Strategy,
    bald_from_probs,
    build_knn_graph,
    descending_order,
    first_open,
    select_batch,
)
from balpm_server.acquisition.reference import balpm_reference, dense_knn_radius
from balpm_server.errors import FailedPrecondition, InvalidArgument

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY = np.finfo(np.float64).tiny


# ---- brute-force transcriptions ---------------------------------------------------------


def brute_dist(X: np.ndarray) -> np.ndarray:
    """All pairwise Euclidean distances, diagonal set to inf (x excludes itself)."""
    Dm = np.linalg.norm(X[:, None, :] - X[None, :, :], axis=-1)
    np.fill_diagonal(Dm, np.inf)
    return Dm


def brute_radius(X: np.ndarray, k: int) -> np.ndarray:
    return np.sort(brute_dist(X), axis=1)[:, k - 1]


def brute_balpm(X, k, B, cand, acq, epi, beta, d_ent):
    """score(x) = BALD(x) + beta (log 2 r_k(x) - psi(n(x)+1)/d_ent), greedy, ties lowest row."""
    Dm = brute_dist(X)
    r = np.sort(Dm, axis=1)[:, k - 1]
    cand = cand.copy()
    acq = acq.copy()
    epi = np.zeros(len(X)) if epi is None else epi
    out = []
    for _ in range(B):
        best = None
        for x in np.flatnonzero(cand):
            n = int(sum(1 for p in np.flatnonzero(acq) if p != x and Dm[x, p] <= r[x]))
            ent = np.log(2 * max(r[x], TINY)) - digamma(n + 1.0) / d_ent
            tot = epi[x] + beta * ent
            if best is None or tot > best[1]:
                best = (int(x), tot, epi[x], ent)
        assert best is not None
        out.append(best)
        cand[best[0]] = False
        acq[best[0]] = True
    return out


def masks(draw_rng: np.random.Generator, n: int, p_cand: float, p_acq: float):
    cand = draw_rng.random(n) < p_cand
    acq = (draw_rng.random(n) < p_acq) & (~cand | (draw_rng.random(n) < 0.2))
    return cand, acq


@st.composite
def pools(draw, max_n: int = 60):
    k = draw(st.sampled_from([1, 2, 5, 13]))
    n = draw(st.integers(k + 1, max(k + 2, max_n)))
    d = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["int", "gauss"]))
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 3, (n, d)).astype(np.float64) if kind == "int" else rng.standard_normal((n, d))
    cand, acq = masks(rng, n, draw(st.floats(0.3, 1.0)), draw(st.floats(0.0, 0.5)))
    if cand.sum() == 0:
        cand[rng.integers(n)] = True
    b = draw(st.integers(1, min(20, int(cand.sum()))))
    epi = rng.random(n) * draw(st.sampled_from([0.0, 0.05, 1.0]))
    if kind == "int":
        epi = np.round(epi, 1)  # exact ties in the epistemic term too
    beta = draw(st.sampled_from([0.0, 0.01, 0.5, 3.0]))
    d_ent = draw(st.sampled_from([1.0, float(d), 0.3]))
    return X, k, b, cand, acq, epi, beta, d_ent


def assert_batch_matches(batch, expected):
    assert batch.indices_B.tolist() == [e[0] for e in expected]
    np.testing.assert_allclose(batch.total_B, [e[1] for e in expected], rtol=0, atol=1e-6)
    np.testing.assert_allclose(batch.epistemic_B, [e[2] for e in expected], rtol=0, atol=1e-6)
    np.testing.assert_allclose(batch.entropy_B, [e[3] for e in expected], rtol=0, atol=1e-6)


# ---- BAL-PM -------------------------------------------------------------------------------


@PROPS
@given(pools())
def test_fast_greedy_balpm_matches_brute_force(pool):
    X, k, b, cand, acq, epi, beta, d_ent = pool
    graph = build_knn_graph(X, k)
    params = AcquisitionParams(k=k, beta=beta, d_ent=d_ent)
    batch = select_batch(
        Strategy.BALPM, batch_size=b, candidate_mask_N=cand, acquired_mask_N=acq,
        rng=np.random.default_rng(0), params=params, epistemic_N=epi, graph=graph,
    )
    assert_batch_matches(batch, brute_balpm(X, k, b, cand, acq, epi, beta, d_ent))


@settings(max_examples=30, deadline=None)
@given(pools())
def test_reference_implementation_matches_brute_force(pool):
    X, k, b, cand, acq, epi, beta, d_ent = pool
    ref = balpm_reference(X, k, batch_size=b, candidate_mask_N=cand, acquired_mask_N=acq,
                          epistemic_N=epi, beta=beta, d_ent=d_ent)
    assert_batch_matches(ref, brute_balpm(X, k, b, cand, acq, epi, beta, d_ent))


@PROPS
@given(pools())
def test_entropy_only_matches_brute_force_with_epistemic_fixed_at_zero(pool):
    X, k, b, cand, acq, epi, beta, d_ent = pool
    graph = build_knn_graph(X, k)
    params = AcquisitionParams(k=k, beta=beta, d_ent=d_ent)
    batch = select_batch(
        Strategy.ENTROPY_ONLY, batch_size=b, candidate_mask_N=cand, acquired_mask_N=acq,
        rng=np.random.default_rng(0), params=params, epistemic_N=epi, graph=graph,
    )
    assert_batch_matches(batch, brute_balpm(X, k, b, cand, acq, None, beta, d_ent))
    assert (batch.epistemic_B == 0).all()


@settings(max_examples=25, deadline=None)
@given(pools(max_n=40))
def test_balpm_without_posterior_falls_back_to_entropy_term(pool):
    X, k, b, cand, acq, _, beta, d_ent = pool
    graph = build_knn_graph(X, k)
    params = AcquisitionParams(k=k, beta=beta, d_ent=d_ent)
    kw = dict(batch_size=b, candidate_mask_N=cand, acquired_mask_N=acq, params=params, graph=graph)
    no_post = select_batch(Strategy.BALPM, rng=np.random.default_rng(0), epistemic_N=None, **kw)
    ent_only = select_batch(Strategy.ENTROPY_ONLY, rng=np.random.default_rng(0), **kw)
    assert no_post.indices_B.tolist() == ent_only.indices_B.tolist()
    np.testing.assert_array_equal(no_post.total_B, ent_only.total_B)


@PROPS
@given(pools())
def test_knn_graph_balls_are_exact_closed_balls_with_reverse_lists(pool):
    X, k, *_ = pool
    graph = build_knn_graph(X, k)
    Dm = brute_dist(X)
    r = np.sort(Dm, axis=1)[:, k - 1]
    np.testing.assert_array_equal(graph.radius_N, r)
    for x in range(len(X)):
        assert sorted(graph.ball(x).tolist()) == np.flatnonzero(Dm[x] <= r[x]).tolist()
        assert graph.reverse(x).tolist() == np.flatnonzero(Dm[:, x] <= r).tolist()


def test_knn_graph_widens_balls_of_large_duplicate_groups():
    X = np.zeros((70, 3))
    X[50:] = np.arange(20)[:, None] + 5.0  # 50 identical prompts, then a spread tail
    graph = build_knn_graph(X, 3)
    assert graph.radius_N[0] == 0.0
    assert sorted(graph.ball(0).tolist()) == list(range(1, 50))
    assert graph.counts_inside(np.arange(70) < 10)[20] == 10


def test_standardized_graph_is_the_graph_of_z_scored_features():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((80, 5)) * np.array([1.0, 100.0, 0.01, 5.0, 1.0]) + 7.0
    X[:, 4] = 2.0  # constant dimension: std 0 is treated as 1
    Z = (X - X.mean(axis=0)) / np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0)
    graph = build_knn_graph(X, 5, standardize=True)
    np.testing.assert_allclose(graph.radius_N, brute_radius(Z, 5), rtol=1e-12)
    assert graph.standardized


def test_approximate_hnsw_graph_has_upper_bound_radii_and_high_recall():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 16)).astype(np.float32)
    exact = build_knn_graph(X, 13)
    approx = build_knn_graph(X, 13, exact_threshold=100)
    assert exact.exact and not approx.exact
    assert (approx.radius_N >= exact.radius_N - 1e-9).all()
    assert np.mean(np.isclose(approx.radius_N, exact.radius_N)) > 0.9


def test_knn_graph_save_load_roundtrip(tmp_path: pathlib.Path):
    X = np.random.default_rng(1).standard_normal((100, 4))
    graph = build_knn_graph(X, 5, standardize=True)
    path = tmp_path / "graph.npz"
    graph.save(path)
    loaded = KnnGraph.load(path)
    assert (loaded.k, loaded.n_items, loaded.exact, loaded.standardized) == (5, 100, True, True)
    for name in ("radius_N", "ball_indptr", "ball_indices", "reverse_indptr", "reverse_indices"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(graph, name))


def test_reference_implementation_matches_fast_greedy():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((600, 24)).astype(np.float32)
    cand, acq = masks(rng, 600, 0.9, 0.1)
    epi = rng.random(600) * 0.05
    np.testing.assert_array_equal(dense_knn_radius(X, 7), build_knn_graph(X, 7).radius_N)
    fast = select_batch(
        Strategy.BALPM, batch_size=40, candidate_mask_N=cand, acquired_mask_N=acq,
        rng=np.random.default_rng(0), params=AcquisitionParams(k=7, beta=0.02),
        epistemic_N=epi, graph=build_knn_graph(X, 7),
    )
    ref = balpm_reference(
        X, 7, batch_size=40, candidate_mask_N=cand, acquired_mask_N=acq,
        epistemic_N=epi, beta=0.02, d_ent=1.0,
    )
    assert fast.indices_B.tolist() == ref.indices_B.tolist()
    np.testing.assert_allclose(fast.total_B, ref.total_B, rtol=0, atol=1e-12)


def test_concurrent_batches_continue_the_joint_greedy():
    """In-flight awareness: a batch leased to someone else counts as acquired."""
    rng = np.random.default_rng(11)
    X = rng.standard_normal((300, 6))
    epi = rng.random(300) * 0.1
    graph = build_knn_graph(X, 13)
    params = AcquisitionParams(beta=0.2)
    cand = np.ones(300, dtype=bool)
    acq = np.zeros(300, dtype=bool)
    kw = dict(rng=np.random.default_rng(0), params=params, epistemic_N=epi, graph=graph)
    joint = select_batch(Strategy.BALPM, batch_size=20, candidate_mask_N=cand,
                         acquired_mask_N=acq, **kw)
    first = select_batch(Strategy.BALPM, batch_size=10, candidate_mask_N=cand,
                         acquired_mask_N=acq, **kw)
    leased = np.zeros(300, dtype=bool)
    leased[first.indices_B] = True
    second = select_batch(Strategy.BALPM, batch_size=10, candidate_mask_N=cand & ~leased,
                          acquired_mask_N=leased, **kw)
    assert first.indices_B.tolist() + second.indices_B.tolist() == joint.indices_B.tolist()


# ---- BALD and stochastic BALD -------------------------------------------------------------


@PROPS
@given(st.integers(1, 40), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_bald_from_probs_matches_closed_form(n, e, seed):
    rng = np.random.default_rng(seed)
    probs = rng.random((n, e))
    probs[rng.random((n, e)) < 0.1] = 0.0
    probs[rng.random((n, e)) < 0.1] = 1.0

    def h(p):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.nan_to_num(-p * np.log(p)) + np.nan_to_num(-(1 - p) * np.log(1 - p))

    expected = h(probs.mean(axis=1)) - h(probs).mean(axis=1)
    got = bald_from_probs(probs)
    np.testing.assert_allclose(got, np.maximum(expected, 0), rtol=0, atol=1e-12)
    assert (got >= 0).all()


def test_bald_from_probs_rejects_out_of_range():
    with pytest.raises(InvalidArgument) as e:
        bald_from_probs(np.array([[0.5, 1.2]]))
    assert e.value.field == "probs"
    with pytest.raises(InvalidArgument):
        bald_from_probs(np.array([0.5, 0.2]))


@st.composite
def scored_pools(draw):
    n = draw(st.integers(1, 60))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cand = rng.random(n) < draw(st.floats(0.2, 1.0))
    cand[rng.integers(n)] = True
    epi = np.round(rng.random(n), draw(st.sampled_from([1, 6])))  # round 1: many ties
    b = draw(st.integers(1, int(cand.sum())))
    return cand, epi, b


@PROPS
@given(scored_pools())
def test_bald_top_k_equals_stable_argsort(pool):
    cand, epi, b = pool
    batch = select_batch(
        Strategy.BALD, batch_size=b, candidate_mask_N=cand, acquired_mask_N=~cand,
        rng=np.random.default_rng(0), params=AcquisitionParams(), epistemic_N=epi,
    )
    rows = np.flatnonzero(cand)
    expected = sorted(rows.tolist(), key=lambda r: (-epi[r], r))[:b]
    assert batch.indices_B.tolist() == expected
    np.testing.assert_array_equal(batch.total_B, epi[expected])


@PROPS
@given(scored_pools(), st.integers(1, 64))
def test_walking_the_cached_ranking_equals_bald_top_k(pool, chunk):
    """The service's BALD fast path: rank the pool once, then take the first open rows."""
    cand, epi, b = pool
    pool_rows = np.arange(len(cand))
    order = descending_order(epi, pool_rows[::-1])  # input order must not matter
    looked: list[int] = []

    def is_open(rows):
        looked.extend(rows.tolist())
        return cand[rows]

    rows_B = first_open(order, b, is_open, chunk=chunk)
    batch = select_batch(
        Strategy.BALD, batch_size=b, candidate_mask_N=cand, acquired_mask_N=~cand,
        rng=np.random.default_rng(0), params=AcquisitionParams(), epistemic_N=epi,
    )
    assert rows_B.tolist() == batch.indices_B.tolist()
    # It stops once the batch is full: chunks double, so it looks at < 2 x (last pick position + 1) + chunk rows.
    last = int(np.flatnonzero(order == rows_B[-1])[0])
    assert len(looked) < 2 * (last + 1) + chunk
    assert first_open(order, int(cand.sum()) + 1, lambda r: cand[r]).size == int(cand.sum())  # runs out: fewer


@PROPS
@given(
    scored_pools(),
    st.sampled_from([Strategy.SOFTMAX_BALD, Strategy.POWER_BALD, Strategy.SOFTRANK_BALD]),
    st.sampled_from([0.5, 1.0, 8.0]),
    st.integers(0, 2**32 - 1),
)
def test_stochastic_bald_equals_gumbel_top_k_formula(pool, strategy, temperature, seed):
    cand, epi, b = pool
    batch = select_batch(
        strategy, batch_size=b, candidate_mask_N=cand, acquired_mask_N=np.zeros_like(cand),
        rng=np.random.default_rng(seed), params=AcquisitionParams(temperature=temperature),
        epistemic_N=epi,
    )
    rows = np.flatnonzero(cand)
    g = np.random.default_rng(seed).gumbel(size=rows.size)  # documented: the only draw
    s = epi[rows]
    if strategy is Strategy.SOFTMAX_BALD:
        keys = temperature * s + g
    elif strategy is Strategy.POWER_BALD:
        keys = temperature * np.log(np.maximum(s, TINY)) + g
    else:
        by_rank = sorted(range(rows.size), key=lambda i: (-s[i], rows[i]))
        rank = np.empty(rows.size)
        rank[by_rank] = np.arange(1, rows.size + 1)
        keys = -temperature * np.log(rank) + g
    expected = sorted(range(rows.size), key=lambda i: (-keys[i], rows[i]))[:b]
    assert batch.indices_B.tolist() == rows[expected].tolist()
    np.testing.assert_allclose(batch.total_B, keys[expected], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(batch.epistemic_B, s[expected])


def test_random_draws_uniformly_without_replacement_from_candidates():
    cand = np.zeros(100, dtype=bool)
    cand[::3] = True
    batch = select_batch(
        Strategy.RANDOM, batch_size=20, candidate_mask_N=cand, acquired_mask_N=~cand,
        rng=np.random.default_rng(42), params=AcquisitionParams(),
    )
    expected = np.random.default_rng(42).choice(np.flatnonzero(cand), size=20, replace=False)
    assert batch.indices_B.tolist() == expected.tolist()
    assert len(set(batch.indices_B.tolist())) == 20 and cand[batch.indices_B].all()
    counts = np.zeros(100)
    rng = np.random.default_rng(0)
    for _ in range(400):
        counts[select_batch(Strategy.RANDOM, batch_size=5, candidate_mask_N=cand,
                            acquired_mask_N=~cand, rng=rng,
                            params=AcquisitionParams()).indices_B] += 1
    assert counts[~cand].sum() == 0
    assert counts[cand].min() > 30 and counts[cand].max() < 90  # mean 58.8


# ---- APL ----------------------------------------------------------------------------------


def apl_pool(n: int, seed: int, *, with_entropy: bool):
    rng = np.random.default_rng(seed)
    cols = [rng.normal(-50, 10, n) for _ in range(4)]
    ent = rng.random(n) * 3 if with_entropy else None
    return AplInputs(*cols, predictive_entropy_N=ent)


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("top_s", [0, 7, 1000])
def test_apl_strategies_follow_their_definitions(with_entropy, top_s):
    n, b, beta_dpo = 50, 5, 0.3
    apl = apl_pool(n, 2, with_entropy=with_entropy)
    cand = np.arange(n) % 4 != 0
    rows = np.flatnonzero(cand)
    params = AcquisitionParams(apl_beta_dpo=beta_dpo, apl_entropy_top_s=top_s)
    cert = np.abs(beta_dpo * (apl.logp_policy_a_N - apl.logp_ref_a_N)
                  - beta_dpo * (apl.logp_policy_b_N - apl.logp_ref_b_N))
    ent = (apl.predictive_entropy_N if with_entropy
           else -(apl.logp_policy_a_N + apl.logp_policy_b_N) / 2)

    def run(strategy):
        return select_batch(strategy, batch_size=b, candidate_mask_N=cand,
                            acquired_mask_N=~cand, rng=np.random.default_rng(0),
                            params=params, apl=apl)

    def top(score, among, m):
        return sorted(among, key=lambda r: (-score[r], r))[:m]

    assert run(Strategy.APL_CERTAINTY).indices_B.tolist() == top(cert, rows, b)
    assert run(Strategy.APL_ENTROPY).indices_B.tolist() == top(ent, rows, b)
    s = min(max(top_s or 4 * b, b), rows.size)
    hybrid = run(Strategy.APL_HYBRID)
    assert hybrid.indices_B.tolist() == top(cert, top(ent, rows, s), b)
    np.testing.assert_allclose(hybrid.total_B, cert[hybrid.indices_B])


def test_apl_missing_candidate_scores_fail_precondition():
    apl = apl_pool(20, 0, with_entropy=False)
    apl.logp_ref_b_N[3] = np.nan
    cand = np.ones(20, dtype=bool)
    kw = dict(batch_size=2, candidate_mask_N=cand, acquired_mask_N=~cand,
              rng=np.random.default_rng(0), params=AcquisitionParams(), apl=apl)
    with pytest.raises(FailedPrecondition) as e:
        select_batch(Strategy.APL_CERTAINTY, **kw)
    assert (e.value.field, e.value.reason) == ("apl", "MISSING_ITEM_SCORES")
    select_batch(Strategy.APL_ENTROPY, **kw)  # entropy does not need the reference model
    cand[3] = False  # a non-candidate may lack scores
    select_batch(Strategy.APL_CERTAINTY, **{**kw, "candidate_mask_N": cand})
    with pytest.raises(FailedPrecondition):
        select_batch(Strategy.APL_ENTROPY, **{**kw, "apl": None})


# ---- determinism and errors ---------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(Strategy))
def test_fixed_seed_gives_identical_batch(strategy):
    rng = np.random.default_rng(9)
    X = rng.standard_normal((200, 8))
    cand, acq = masks(rng, 200, 0.7, 0.2)
    epi = rng.random(200)
    graph = build_knn_graph(X, 13)
    apl = apl_pool(200, 1, with_entropy=False)

    def run(seed):
        return select_batch(strategy, batch_size=16, candidate_mask_N=cand, acquired_mask_N=acq,
                            rng=np.random.default_rng(seed), params=AcquisitionParams(),
                            epistemic_N=epi, graph=graph, apl=apl)

    a, b = run(123), run(123)
    assert a.indices_B.tolist() == b.indices_B.tolist()
    assert len(set(a.indices_B.tolist())) == 16 and cand[a.indices_B].all()
    assert a.indices_B.dtype == np.int64
    np.testing.assert_array_equal(a.total_B, b.total_B)
    if strategy in (Strategy.RANDOM, Strategy.SOFTMAX_BALD):
        assert a.indices_B.tolist() != run(124).indices_B.tolist()


def test_invalid_requests_raise_typed_errors():
    n = 30
    X = np.random.default_rng(0).standard_normal((n, 3))
    cand = np.ones(n, dtype=bool)
    acq = np.zeros(n, dtype=bool)
    base = dict(candidate_mask_N=cand, acquired_mask_N=acq, rng=np.random.default_rng(0),
                params=AcquisitionParams(k=5))
    with pytest.raises(InvalidArgument) as e:
        select_batch(Strategy.RANDOM, batch_size=0, **base)
    assert e.value.field == "batch_size"
    with pytest.raises(FailedPrecondition) as e:
        select_batch(Strategy.RANDOM, batch_size=n + 1, **base)
    assert e.value.field == "batch_size"
    for strategy in (Strategy.BALD, Strategy.SOFTRANK_BALD):
        with pytest.raises(FailedPrecondition) as e:
            select_batch(strategy, batch_size=2, **base)
        assert (e.value.field, e.value.reason) == ("strategy", "NO_POSTERIOR")
    with pytest.raises(InvalidArgument):
        select_batch(Strategy.BALPM, batch_size=2, **base)
    with pytest.raises(InvalidArgument) as e:
        select_batch(Strategy.BALPM, batch_size=2, graph=build_knn_graph(X, 4), **base)
    assert e.value.field == "k"
    with pytest.raises(InvalidArgument) as e:
        select_batch(Strategy.BALD, batch_size=2, epistemic_N=np.full(n, np.nan), **base)
    assert e.value.field == "epistemic_N"
    with pytest.raises(InvalidArgument) as e:
        select_batch(Strategy.RANDOM, batch_size=2, **{**base, "acquired_mask_N": acq[:-1]})
    assert e.value.field == "acquired_mask_N"
    with pytest.raises(InvalidArgument) as e:
        select_batch(Strategy.BALPM, batch_size=2, **{**base, "params": AcquisitionParams(d_ent=0)})
    assert e.value.field == "d_ent"
    with pytest.raises(FailedPrecondition) as e:
        build_knn_graph(X[:5], 5)
    assert e.value.reason == "POOL_TOO_SMALL"
    with pytest.raises(InvalidArgument):
        build_knn_graph(np.full((10, 2), np.nan), 3)
