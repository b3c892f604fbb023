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
    KnnConvention,
    KnnGraph,
    Strategy,
    bald_from_probs,
    build_knn_graph,
    descending_order,
    first_open,
    select_batch,
)
from balpm_server.acquisition.reference import authors_reference, balpm_reference, dense_knn_radius
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


# ---- held-out rows are not kNN neighbours (issue 15, item 13) -----------------------------


def sub_graph_reindexed(X: np.ndarray, k: int, member: np.ndarray, **kw):
    """The graph of the member rows alone, with row numbers mapped back to all N rows."""
    rows = np.flatnonzero(member)
    return rows, build_knn_graph(X[rows], k, **kw)


@PROPS
@given(pools(), st.integers(0, 2**32 - 1), st.booleans())
def test_member_mask_graph_equals_graph_of_member_rows_alone(pool, seed, standardize):
    X, k, *_ = pool
    rng = np.random.default_rng(seed)
    n = len(X)
    member = rng.random(n) < rng.uniform(0.5, 1.0)
    member[rng.choice(n, size=k + 1, replace=False)] = True  # more than k members
    X = X.copy()
    X[~member] = rng.standard_normal(((~member).sum(), X.shape[1])) * 1e3  # would dominate std
    graph = build_knn_graph(X, k, standardize=standardize, member_mask_N=member)
    rows, sub = sub_graph_reindexed(X, k, member, standardize=standardize)
    assert graph.n_items == n and graph.n_members == rows.size and graph.exact
    np.testing.assert_array_equal(graph.members(), member)
    np.testing.assert_array_equal(graph.radius_N[rows], sub.radius_N)
    assert np.isnan(graph.radius_N[~member]).all()
    ball_of = {int(r): graph.ball(int(r)).tolist() for r in range(n)}
    rev_of = {int(r): graph.reverse(int(r)).tolist() for r in range(n)}
    for i, r in enumerate(rows):
        assert ball_of[int(r)] == rows[sub.ball(i)].tolist()  # same order: distance, then row
        assert rev_of[int(r)] == rows[sub.reverse(i)].tolist()
    for r in np.flatnonzero(~member):
        assert ball_of[int(r)] == [] and rev_of[int(r)] == []
    assert graph.n_entries == sub.n_entries
    acq = rng.random(n) < 0.4
    np.testing.assert_array_equal(graph.counts_inside(acq)[rows], sub.counts_inside(acq[rows]))
    assert (graph.counts_inside(acq)[~member] == 0).all()


def entropy_only_ids(X, k, member=None, cand=None):
    n = len(X)
    member = np.ones(n, dtype=bool) if member is None else member
    graph = build_knn_graph(X, k, member_mask_N=None if member.all() else member)
    return select_batch(
        Strategy.ENTROPY_ONLY, batch_size=int(member.sum()),
        candidate_mask_N=member if cand is None else cand, acquired_mask_N=np.zeros(n, dtype=bool),
        rng=np.random.default_rng(0), params=AcquisitionParams(k=k, beta=1.0), graph=graph,
    ).indices_B.tolist()


def test_heldout_rows_are_not_neighbours_issue_15_reproducer():
    pool = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]])
    assert entropy_only_ids(pool, 1) == [4, 3, 2, 0, 1]
    with_heldout = np.vstack([pool, [[0.1]]])
    everyone = np.ones(6, dtype=bool)
    # The defect: a graph over all rows lets the held-out [0.1] shrink the ball of row 0.
    graph_all = build_knn_graph(with_heldout, 1)
    buggy = select_batch(
        Strategy.ENTROPY_ONLY, batch_size=5, candidate_mask_N=everyone & (np.arange(6) < 5),
        acquired_mask_N=np.zeros(6, dtype=bool), rng=np.random.default_rng(0),
        params=AcquisitionParams(k=1, beta=1.0), graph=graph_all,
    )
    assert buggy.indices_B.tolist() == [4, 3, 2, 1, 0]
    # The fix: pool rows only as members, whatever held-out rows exist and wherever they sit.
    rng = np.random.default_rng(0)
    for trial in range(20):
        heldout = np.vstack([[[0.1]], rng.uniform(-1, 16, (trial % 6, 1))])
        n = 5 + len(heldout)
        at = np.sort(rng.choice(n, size=5, replace=False))  # pool rows keep their order (ties)
        member = np.zeros(n, dtype=bool)
        member[at] = True
        Xp = np.empty((n, 1))
        Xp[at] = pool
        Xp[~member] = heldout
        ids = entropy_only_ids(Xp, 1, member=member)
        assert [int(np.searchsorted(at, i)) for i in ids] == [4, 3, 2, 0, 1]


def test_member_mask_survives_save_load_and_old_graph_files_are_rejected(tmp_path: pathlib.Path):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((60, 3))
    member = rng.random(60) < 0.7
    graph = build_knn_graph(X, 4, standardize=True, member_mask_N=member)
    graph.save(tmp_path / "g.npz")
    loaded = KnnGraph.load(tmp_path / "g.npz")
    np.testing.assert_array_equal(loaded.member_mask_N, member)
    np.testing.assert_array_equal(loaded.radius_N, graph.radius_N)  # NaN outside the members
    for name in ("ball_indptr", "ball_indices", "reverse_indptr", "reverse_indices"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(graph, name))
    plain = build_knn_graph(X, 4)
    plain.save(tmp_path / "p.npz")
    assert KnnGraph.load(tmp_path / "p.npz").member_mask_N is None
    # A file of format 1 (written before member masks; held-out rows were neighbours) is
    # not read as "all members": loading fails, so the service rebuilds it.
    with np.load(tmp_path / "p.npz") as z:
        old = {name: z[name] for name in z.files}
    old["format_version"] = np.int64(1)
    np.savez(tmp_path / "old.npz", **old)
    with pytest.raises(FailedPrecondition) as e:
        KnnGraph.load(tmp_path / "old.npz")
    assert e.value.reason == "GRAPH_FORMAT"


def test_member_mask_errors():
    X = np.random.default_rng(0).standard_normal((20, 2))
    member = np.zeros(20, dtype=bool)
    member[:3] = True
    with pytest.raises(FailedPrecondition) as e:
        build_knn_graph(X, 3, member_mask_N=member)
    assert e.value.reason == "POOL_TOO_SMALL"
    with pytest.raises(InvalidArgument):
        build_knn_graph(X, 2, member_mask_N=member[:-1])
    X_nan = X.copy()
    X_nan[10] = np.nan  # a non-member's features are never read
    graph = build_knn_graph(X_nan, 2, member_mask_N=member)
    with pytest.raises(InvalidArgument) as e:
        select_batch(Strategy.ENTROPY_ONLY, batch_size=2, candidate_mask_N=np.arange(20) < 5,
                     acquired_mask_N=np.zeros(20, dtype=bool), rng=np.random.default_rng(0),
                     params=AcquisitionParams(k=2), graph=graph)
    assert (e.value.field, e.value.reason) == ("candidate_mask_N", "NOT_A_GRAPH_MEMBER")


# ---- KnnConvention.AUTHORS (issue 15, item 14) --------------------------------------------


def authors_pool(seed: int, k: int):
    """Small pools with exact duplicates and ties, partial candidate and acquired masks."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(k + 5, 48))
    d = int(rng.integers(1, 6))
    if seed % 3 == 0:
        X = rng.integers(0, 3, (n, d)).astype(np.float64)  # many ties and duplicates
    else:
        X = rng.standard_normal((n, d))
        dup = rng.choice(n, size=n // 4, replace=False)
        X[dup] = X[rng.integers(0, n, dup.size)]  # exact duplicate prompts
    cand = rng.random(n) < rng.uniform(0.5, 0.95)
    cand[rng.choice(n, size=min(n, k + 2), replace=False)] = True
    acq = ~cand & (rng.random(n) < 0.5)
    acq |= cand & (rng.random(n) < 0.1)  # labels_per_item > 1: acquired and still a candidate
    epi = np.round(rng.random(n), 1) * (0.0 if seed % 4 == 1 else 0.3)
    b = int(rng.integers(1, int(cand.sum()) + 1))
    return X, cand, acq, epi, b


@pytest.mark.parametrize("k", [1, 3, 13])
@pytest.mark.parametrize("seed", range(10))
def test_authors_convention_matches_brute_force(seed, k):
    X, cand, acq, epi, b = authors_pool(seed, k)
    beta = [0.5, 1.0, 3.0, 0.01][seed % 4]
    d_ent = [1.0, float(X.shape[1]), 0.3][seed % 3]
    standardize = seed % 5 == 2
    params = AcquisitionParams(k=k, beta=beta, d_ent=d_ent, knn_convention=KnnConvention.AUTHORS)
    for strategy in (Strategy.BALPM, Strategy.ENTROPY_ONLY):
        batch = select_batch(
            strategy, batch_size=b, candidate_mask_N=cand, acquired_mask_N=acq,
            rng=np.random.default_rng(0), params=params, epistemic_N=epi, prompt_N_D=X,
            standardize_prompt=standardize,
        )
        ref = authors_reference(
            X, k, batch_size=b, candidate_mask_N=cand, acquired_mask_N=acq,
            epistemic_N=epi if strategy is Strategy.BALPM else None, beta=beta, d_ent=d_ent,
            standardize=standardize,
        )
        assert batch.indices_B.tolist() == ref.indices_B.tolist()
        np.testing.assert_allclose(batch.total_B, ref.total_B, rtol=0, atol=1e-9)
        np.testing.assert_allclose(batch.entropy_B, ref.entropy_B, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(batch.epistemic_B, ref.epistemic_B)


def test_authors_convention_matches_brute_force_on_a_larger_float32_pool():
    rng = np.random.default_rng(21)
    X = rng.standard_normal((260, 12)).astype(np.float32)
    X[200:230] = X[:30]  # duplicated prompts
    cand, acq = masks(rng, 260, 0.8, 0.3)
    epi = rng.random(260) * 0.05
    params = AcquisitionParams(k=13, beta=0.02, knn_convention=KnnConvention.AUTHORS)
    batch = select_batch(Strategy.BALPM, batch_size=40, candidate_mask_N=cand, acquired_mask_N=acq,
                         rng=np.random.default_rng(0), params=params, epistemic_N=epi, prompt_N_D=X)
    ref = authors_reference(X, 13, batch_size=40, candidate_mask_N=cand, acquired_mask_N=acq,
                            epistemic_N=epi, beta=0.02, d_ent=1.0)
    assert batch.indices_B.tolist() == ref.indices_B.tolist()
    np.testing.assert_allclose(batch.total_B, ref.total_B, rtol=0, atol=1e-9)


def test_authors_reference_follows_the_definition_by_hand():
    # 1-D points 0, 1, 3, 7, 15; all candidates, nothing acquired, k = 2: with the point
    # itself included the 2nd smallest distance is the nearest other point: 1, 1, 2, 4, 8.
    X = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]])
    cand = np.ones(5, dtype=bool)
    acq = np.zeros(5, dtype=bool)
    kw = dict(batch_size=5, candidate_mask_N=cand, acquired_mask_N=acq, epistemic_N=None,
              beta=1.0, d_ent=1.0)
    ref = authors_reference(X, 2, **kw)
    assert ref.indices_B.tolist() == [4, 3, 2, 0, 1]
    r = np.array([8.0, 4.0, 2.0, 1.0])
    n = np.array([0, 0, 0, 0])  # 15 is in no ball; 7 in the ball of 15 (gone); 3 in none left
    np.testing.assert_allclose(ref.entropy_B[:4], np.log(2 * r + 1e-4) - digamma(n + 1.0))
    assert ref.entropy_B[4] == pytest.approx(np.log(2 * 1.0 + 1e-4) - digamma(2.0))  # 0 acquired
    # k = 1: every radius is 0 (the point itself), so only exact duplicates are neighbours.
    Xd = np.array([[0.0], [0.0], [5.0], [9.0]])
    ref1 = authors_reference(Xd, 1, batch_size=4, candidate_mask_N=np.ones(4, dtype=bool),
                             acquired_mask_N=np.zeros(4, dtype=bool), epistemic_N=None,
                             beta=1.0, d_ent=1.0)
    assert ref1.indices_B.tolist() == [0, 2, 3, 1]  # row 1 loses: its duplicate was acquired
    assert ref1.entropy_B[-1] == pytest.approx(np.log(1e-4) - digamma(2.0))


def test_authors_population_is_this_calls_candidates():
    X = np.array([[0.0], [1.0], [3.0], [7.0], [15.0], [0.1]])
    acq = np.zeros(6, dtype=bool)
    params = AcquisitionParams(k=2, beta=1.0, knn_convention=KnnConvention.AUTHORS)

    def run(cand, acquired=acq, b=1):
        return select_batch(Strategy.ENTROPY_ONLY, batch_size=b, candidate_mask_N=cand,
                            acquired_mask_N=acquired, rng=np.random.default_rng(0), params=params,
                            prompt_N_D=X)

    everyone = np.ones(6, dtype=bool)
    no_5 = everyone & (np.arange(6) != 5)  # row 5 leased to someone else: not in the population
    assert run(no_5, b=5).indices_B.tolist() == [4, 3, 2, 0, 1]
    assert run(everyone, b=6).indices_B.tolist() == [4, 3, 2, 1, 0, 5]
    # Rows outside the population still count in n(x) when acquired: row 5 leased.
    leased = ~no_5
    first = run(no_5, acquired=leased, b=5)
    assert first.indices_B.tolist() == [4, 3, 2, 0, 1]
    # n(1) = 2 at its pick: row 0 (picked before it) and the leased row 5 (d = 0.9 <= 1).
    assert first.entropy_B[-1] == pytest.approx(np.log(2 * 1.0 + 1e-4) - digamma(3.0))
    assert first.entropy_B[-2] == pytest.approx(np.log(2 * 1.0 + 1e-4) - digamma(2.0))


def test_authors_convention_errors_and_graph_free():
    X = np.random.default_rng(0).standard_normal((30, 3))
    cand = np.ones(30, dtype=bool)
    acq = np.zeros(30, dtype=bool)
    params = AcquisitionParams(k=5, knn_convention=KnnConvention.AUTHORS)
    base = dict(candidate_mask_N=cand, acquired_mask_N=acq, rng=np.random.default_rng(0), params=params)
    with pytest.raises(InvalidArgument) as e:
        select_batch(Strategy.BALPM, batch_size=2, **base)
    assert (e.value.field, e.value.reason) == ("prompt_N_D", "MISSING_PROMPT_FEATURES")
    with pytest.raises(InvalidArgument) as e:
        select_batch(Strategy.BALPM, batch_size=2, prompt_N_D=X[:-1], **base)
    assert e.value.field == "prompt_N_D"
    batch = select_batch(Strategy.BALPM, batch_size=3, prompt_N_D=X, **base)  # no graph needed
    assert len(batch) == 3
    few = np.arange(30) < 4
    with pytest.raises(FailedPrecondition) as e:
        select_batch(Strategy.ENTROPY_ONLY, batch_size=2, prompt_N_D=X, **{**base, "candidate_mask_N": few})
    assert (e.value.field, e.value.reason) == ("k", "POOL_TOO_SMALL")
    with pytest.raises(InvalidArgument) as e:
        select_batch(Strategy.RANDOM, batch_size=2, **{**base, "params": AcquisitionParams(knn_convention="X")})
    assert e.value.field == "knn_convention"
    # The convention may come as its string value; non-graph strategies ignore it.
    by_name = select_batch(Strategy.BALPM, batch_size=3, prompt_N_D=X,
                           **{**base, "params": AcquisitionParams(k=5, knn_convention="AUTHORS")})
    assert by_name.indices_B.tolist() == batch.indices_B.tolist()


def test_standard_convention_ignores_prompt_features():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((120, 5))
    cand, acq = masks(rng, 120, 0.8, 0.2)
    epi = rng.random(120) * 0.1
    kw = dict(batch_size=12, candidate_mask_N=cand, acquired_mask_N=acq, rng=np.random.default_rng(0),
              params=AcquisitionParams(k=5, beta=0.3), epistemic_N=epi, graph=build_knn_graph(X, 5))
    plain = select_batch(Strategy.BALPM, **kw)
    with_feats = select_batch(Strategy.BALPM, prompt_N_D=X, **kw)
    assert plain.indices_B.tolist() == with_feats.indices_B.tolist()
    np.testing.assert_array_equal(plain.total_B, with_feats.total_B)
    assert AcquisitionParams().knn_convention is KnnConvention.STANDARD
