"""Unit tests of the MLP-ensemble posterior (ensemble, metrics, store)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from balpm_server import errors
from balpm_server.posterior import (
    EnsembleConfig,
    PosteriorStore,
    TrainProgress,
    bald_scores,
    evaluate,
    predict_probs,
    train_ensemble,
    train_members_sequentially,
)
from balpm_server.posterior.ensemble import bt_logits, bt_loss, init_member


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread avoids OpenMP wake-up costs on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = EnsembleConfig(ensemble_size=3, hidden_sizes=(16, 8), epochs=3, batch_size=32,
                       val_fraction=0.2, device="cpu")


def _synthetic(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels from a hidden linear reward over random features."""
    rng = np.random.default_rng(seed)
    w_D = rng.normal(size=d)
    a_N_D = rng.normal(size=(n, d)).astype(np.float32)
    b_N_D = rng.normal(size=(n, d)).astype(np.float32)
    t_N = ((a_N_D - b_N_D) @ w_D > 0).astype(np.float64)
    return a_N_D, b_N_D, t_N


# ---------------------------------------------------------------------- BT loss


def test_bt_loss_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    params = init_member(5, (4,), init_seed=7, dtype=torch.float64)
    params = {k: torch.cat([v, v * 0.5]).requires_grad_(True) for k, v in params.items()}  # E = 2
    a_E_B_D = torch.randn(2, 6, 5, dtype=torch.float64)
    b_E_B_D = torch.randn(2, 6, 5, dtype=torch.float64)
    t_B = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.5], dtype=torch.float64)

    def total() -> torch.Tensor:
        return bt_loss(bt_logits(params, a_E_B_D, b_E_B_D), t_B).sum()

    total().backward()
    eps = 1e-6
    with torch.no_grad():
        for name, p in params.items():
            assert p.grad is not None
            flat, grad = p.view(-1), p.grad.view(-1)
            for i in range(0, flat.numel(), max(1, flat.numel() // 7)):
                old = flat[i].item()
                flat[i] = old + eps
                up = total().item()
                flat[i] = old - eps
                down = total().item()
                flat[i] = old
                assert (up - down) / (2 * eps) == pytest.approx(grad[i].item(), abs=1e-7), name


def test_bt_loss_values() -> None:
    logits_E_B = torch.tensor([[0.0, 2.0, -1.0]], dtype=torch.float64)
    t_B = torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)
    expected = (math.log(2) + math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 3
    assert bt_loss(logits_E_B, t_B).item() == pytest.approx(expected, rel=1e-12)


# -------------------------------------------------------------------- training


def test_batched_equals_sequential_float64() -> None:
    a, b, t = _synthetic(300, 10, seed=1)
    t[::7] = 0.5  # some ties
    batched = train_ensemble(a, b, t, SMALL, seed=3, dtype=torch.float64)
    seq = train_members_sequentially(a, b, t, SMALL, seed=3, dtype=torch.float64)
    assert set(batched.state.tensors) == set(seq.state.tensors)
    for k, v in batched.state.tensors.items():
        assert v.shape[0] == SMALL.ensemble_size
        torch.testing.assert_close(v, seq.state.tensors[k], atol=1e-5, rtol=0)
    assert batched.val_log_likelihood == pytest.approx(seq.val_log_likelihood, abs=1e-9)
    # Members differ (own init seed and bootstrap order).
    W0 = batched.state.tensors["W0"]
    assert not torch.allclose(W0[0], W0[1])


def test_batched_equals_sequential_with_early_stopping_and_warm_start() -> None:
    a, b, t = _synthetic(200, 6, seed=2)
    t = np.where(np.random.default_rng(0).random(200) < 0.3, 1 - t, t)  # noisy: early stop
    cfg = dataclasses.replace(SMALL, epochs=12, patience=1, learning_rate=1e-2)
    first = train_ensemble(a, b, t, cfg, seed=5, dtype=torch.float64)
    warm = dataclasses.replace(cfg, warm_start=True, epochs=3)
    batched = train_ensemble(a, b, t, warm, seed=6, init=first.state, dtype=torch.float64)
    seq = train_members_sequentially(a, b, t, warm, seed=6, init=first.state, dtype=torch.float64)
    for k, v in batched.state.tensors.items():
        torch.testing.assert_close(v, seq.state.tensors[k], atol=1e-5, rtol=0)


def test_same_seed_is_deterministic_and_seed_matters() -> None:
    a, b, t = _synthetic(200, 8, seed=3)
    r1 = train_ensemble(a, b, t, SMALL, seed=1)
    r2 = train_ensemble(a, b, t, SMALL, seed=1)
    r3 = train_ensemble(a, b, t, SMALL, seed=2)
    torch.testing.assert_close(r1.state.tensors["W0"], r2.state.tensors["W0"], atol=0, rtol=0)
    assert not torch.allclose(r1.state.tensors["W0"], r3.state.tensors["W0"])


def test_learns_synthetic_linear_preference() -> None:
    a, b, t = _synthetic(3000, 16, seed=4)
    cfg = EnsembleConfig(ensemble_size=5, hidden_sizes=(64,), epochs=10, batch_size=64,
                         learning_rate=3e-3, device="cpu")
    seen: list[TrainProgress] = []
    res = train_ensemble(a[:2000], b[:2000], t[:2000], cfg, seed=0, progress=seen.append)
    assert seen and seen[0].epoch == 1 and seen[-1].epochs == 10
    assert res.n_labels == 2000 and 1 <= res.epochs_run <= 10
    assert res.val_log_likelihood > math.log(0.5)
    probs_N_E = predict_probs(res.state, a[2000:], b[2000:])
    assert probs_N_E.shape == (1000, 5) and probs_N_E.dtype == np.float64
    m = evaluate(probs_N_E, t[2000:])
    assert m.accuracy > 0.9
    assert m.log_likelihood > -0.35
    assert m.count == 1000


def test_full_retrain_is_independent_of_init_without_warm_start() -> None:
    a, b, t = _synthetic(100, 4, seed=5)
    first = train_ensemble(a, b, t, SMALL, seed=1)
    again = train_ensemble(a, b, t, SMALL, seed=1, init=first.state)  # warm_start False: ignored
    torch.testing.assert_close(first.state.tensors["W0"], again.state.tensors["W0"])


def test_no_val_slice_gives_nan_val_log_likelihood() -> None:
    a, b, t = _synthetic(64, 4, seed=6)
    cfg = dataclasses.replace(SMALL, val_fraction=0.0, epochs=2)
    seen: list[TrainProgress] = []
    res = train_ensemble(a, b, t, cfg, seed=0, progress=seen.append)
    assert math.isnan(res.val_log_likelihood) and res.epochs_run == 2
    assert all(math.isnan(p.val_log_likelihood) for p in seen)


def test_should_stop_raises_cancelled() -> None:
    a, b, t = _synthetic(200, 4, seed=7)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(errors.Cancelled):
        train_ensemble(a, b, t, SMALL, seed=0, should_stop=stop)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda a, b, t: (a[:, :3], b, t), "feats_b"),
        (lambda a, b, t: (a, b, t[:-1]), "targets"),
        (lambda a, b, t: (np.where(np.eye(*a.shape) > 0, np.nan, a).astype(np.float32), b, t),
         "feats_a"),
        (lambda a, b, t: (a, b, t * 2), "targets"),
        (lambda a, b, t: (a[:0], b[:0], t[:0]), "targets"),
    ],
)
def test_invalid_inputs(mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    a, b, t = _synthetic(20, 4, seed=8)
    with pytest.raises(errors.InvalidArgument) as exc:
        train_ensemble(*mutate(a, b, t), SMALL, seed=0)
    assert exc.value.field == field


def test_invalid_config_and_warm_start_mismatch() -> None:
    a, b, t = _synthetic(20, 4, seed=9)
    with pytest.raises(errors.InvalidArgument) as exc:
        train_ensemble(a, b, t, dataclasses.replace(SMALL, ensemble_size=0), seed=0)
    assert exc.value.field == "config.ensemble_size"
    prev = train_ensemble(a, b, t, dataclasses.replace(SMALL, epochs=1), seed=0)
    warm = dataclasses.replace(SMALL, warm_start=True, hidden_sizes=(4,))
    with pytest.raises(errors.InvalidArgument) as exc:
        train_ensemble(a, b, t, warm, seed=0, init=prev.state)
    assert exc.value.field == "init"
    with pytest.raises(errors.InvalidArgument):
        predict_probs(prev.state, a[:, :3], b[:, :3])


def test_predict_probs_chunks_and_swap_symmetry() -> None:
    a, b, t = _synthetic(50, 4, seed=10)
    state = train_ensemble(a, b, t, SMALL, seed=0).state
    rng = np.random.default_rng(0)
    qa = rng.normal(size=(9000, 4)).astype(np.float32)  # > one predict chunk
    qb = rng.normal(size=(9000, 4)).astype(np.float32)
    p_ab = predict_probs(state, qa, qb)
    p_ba = predict_probs(state, qb, qa)
    np.testing.assert_allclose(p_ab + p_ba, 1.0, atol=1e-6)
    np.testing.assert_allclose(predict_probs(state, qa[8000:], qb[8000:]), p_ab[8000:],
                               atol=1e-6)
    assert predict_probs(state, qa[:0], qb[:0]).shape == (0, 3)


# --------------------------------------------------------------------- metrics


def test_evaluate_hand_computed() -> None:
    probs_N_E = np.array([[0.9, 0.7], [0.2, 0.4], [0.6, 0.6], [0.5, 0.3]])
    t_N = np.array([1.0, 1.0, 0.5, 0.0])
    p = np.array([0.8, 0.3, 0.6, 0.4])
    m = evaluate(probs_N_E, t_N)
    ll = (math.log(0.8) + math.log(0.3) + 0.5 * math.log(0.6) + 0.5 * math.log(0.4)
          + math.log(0.6)) / 4
    assert m.log_likelihood == pytest.approx(ll, rel=1e-12)
    assert m.accuracy == pytest.approx(2 / 3)  # tie excluded; item 2 wrong
    assert m.brier == pytest.approx(float(np.mean((p - t_N) ** 2)))
    # 15 bins of width 1/15: 0.8 -> bin 12, 0.3 -> bin 4, 0.6 -> bin 9 (0.6*15 = 9.0), 0.4 -> bin 6
    ece = (abs(0.8 - 1) + abs(0.3 - 1) + abs(0.6 - 0.5) + abs(0.4 - 0)) / 4
    assert m.ece == pytest.approx(ece)
    h = lambda q: -(q * math.log(q) + (1 - q) * math.log(1 - q))  # noqa: E731
    mi = [h(pm) - (h(x) + h(y)) / 2 for pm, (x, y) in zip(p, probs_N_E, strict=True)]
    assert m.mean_epistemic == pytest.approx(float(np.mean(mi)), rel=1e-9)
    assert m.count == 4


def test_ece_shared_bin() -> None:
    m = evaluate(np.array([[0.70], [0.72], [0.05]]), np.array([1.0, 0.0, 0.0]))
    # 0.70 and 0.72 share bin 10 ([0.667, 0.733)): |0.71 - 0.5| * 2/3 + |0.05 - 0| * 1/3
    assert m.ece == pytest.approx(0.21 * 2 / 3 + 0.05 / 3)


def test_bald_zero_when_members_agree_and_empty_eval() -> None:
    assert np.allclose(bald_scores(np.full((3, 4), 0.3)), 0.0)
    assert bald_scores(np.array([[0.0, 1.0]]))[0] == pytest.approx(math.log(2), rel=1e-6)
    m = evaluate(np.zeros((0, 2)), np.zeros(0))
    assert m.count == 0 and math.isnan(m.log_likelihood)
    with pytest.raises(errors.InvalidArgument):
        evaluate(np.array([[1.5]]), np.array([1.0]))
    with pytest.raises(errors.InvalidArgument):
        evaluate(np.array([[0.5]]), np.array([1.0, 0.0]))


# ----------------------------------------------------------------------- store


def test_store_round_trip_and_versions(tmp_path: Path) -> None:
    a, b, t = _synthetic(80, 6, seed=11)
    res = train_ensemble(a, b, t, SMALL, seed=0)
    store = PosteriorStore(tmp_path / "posterior")
    assert store.latest_version() is None
    v1 = store.save(res.state, {"seed": 0, "metrics": {"val": res.val_log_likelihood}})
    v2 = store.save(res.state, {"seed": 1})
    assert (v1, v2) == (1, 2) and store.latest_version() == 2
    assert (tmp_path / "posterior" / "v000001" / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "posterior").iterdir() if p.name.startswith(".tmp")]
    state, manifest = store.load(1)
    assert manifest["seed"] == 0 and manifest["version"] == 1
    assert state.config == res.state.config and state.input_dim == 6
    np.testing.assert_array_equal(predict_probs(state, a, b), predict_probs(res.state, a, b))
    with pytest.raises(errors.NotFound):
        store.load(3)
    # An unfinished version (no manifest) is not visible.
    (tmp_path / "posterior" / "v000003").mkdir()
    assert store.latest_version() == 2
    with pytest.raises(errors.InvalidArgument):
        store.save(res.state, {"bad": object()})
    manifest_path = tmp_path / "posterior" / "v000002" / "manifest.json"
    assert json.loads(manifest_path.read_text())["seed"] == 1
