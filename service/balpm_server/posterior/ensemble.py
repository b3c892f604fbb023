"""Deep-ensemble posterior of a Bradley-Terry preference model, all members trained at once.

The reward of a (prompt + completion) feature vector is a small tanh MLP head
``r(x)``; the Bradley-Terry likelihood of "A preferred over B" is
``p = sigmoid(r(a) - r(b))``. The posterior over heads is approximated by a deep
ensemble (Lakshminarayanan et al., 2017): E members, each with its own
initialisation seed and its own bootstrap resample / shuffle order, exactly the
posterior used by BAL-PM (Melo et al., NeurIPS 2024) and by APL (Muldrew et al.,
2024), whose online variant continues training from the previous version
(``warm_start``).

All E members live in stacked tensors (E first) and are trained by one chain of
batched matmuls (`torch.baddbmm`); nothing loops over members in Python. Adam(W)
is element-wise and each member's loss only touches its own slice, so the
stacked optimisation is mathematically identical to training the members one by
one (`train_members_sequentially`), which the tests check in float64.

Shape legend:
    N  items (preference pairs)
    E  ensemble members
    D  feature dimension
    H  hidden width (``Hi`` for hidden layer ``i``)
    B  minibatch size (per member)
    M  rows pushed through a head at once (2B: the A and the B sides)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.functional import binary_cross_entropy_with_logits as bce_with_logits

from balpm_server import errors
from balpm_server.bernoulli import log_likelihood

POSTERIOR_KINDS = ("mlp_ensemble", "lora_ensemble")
DEVICES = ("auto", "cpu", "cuda")
PREDICT_CHUNK = 4096  # pairs per forward pass in `predict_probs` (bounds memory for N = 1M)


@dataclass(frozen=True)
class EnsembleConfig:
    """Hyper-parameters of the ensemble posterior.

    Attributes:
        ensemble_size: Number of members E.
        hidden_sizes: Hidden widths of each tanh MLP head (BAL-PM reference: 2048, 256).
        epochs: Maximum epochs (early stopping on a held-out slice may stop sooner).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        batch_size: Pairs per minibatch per member.
        val_fraction: Held-out fraction of the labels for early stopping (0 disables).
        patience: Epochs without validation improvement before a member stops.
        bootstrap: Each member trains on its own bootstrap resample (else the full
            training slice); members always get their own shuffle order.
        warm_start: Continue from ``init`` (the previous version, APL online variant)
            instead of a fresh initialisation.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; bf16
            autocast is used on CUDA.
        posterior: ``"mlp_ensemble"`` (this module) or ``"lora_ensemble"`` (`lora.py`).
        lora_rank: LoRA rank r (``lora_ensemble`` only).
        lora_alpha: LoRA scaling alpha (``lora_ensemble`` only).
        lora_max_length: Token truncation length (``lora_ensemble`` only).
    """

    ensemble_size: int = 5
    hidden_sizes: tuple[int, ...] = (2048, 256)
    epochs: int = 30
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    val_fraction: float = 0.1
    patience: int = 5
    bootstrap: bool = True
    warm_start: bool = False
    device: str = "auto"
    posterior: str = "mlp_ensemble"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_max_length: int = 256

    def validate(self) -> None:
        """Raise `errors.InvalidArgument` naming the first bad field."""
        checks: list[tuple[bool, str, str]] = [
            (self.ensemble_size >= 1, "ensemble_size", "must be >= 1"),
            (all(h >= 1 for h in self.hidden_sizes), "hidden_sizes", "must all be >= 1"),
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate",
             "must be a positive number"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
             "must be >= 0"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)"),
            (self.patience >= 1, "patience", "must be >= 1"),
            (self.device in DEVICES, "device", f"must be one of {DEVICES}"),
            (self.posterior in POSTERIOR_KINDS, "posterior", f"must be one of {POSTERIOR_KINDS}"),
            (self.lora_rank >= 1, "lora_rank", "must be >= 1"),
            (self.lora_alpha > 0, "lora_alpha", "must be > 0"),
            (self.lora_max_length >= 2, "lora_max_length", "must be >= 2"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise errors.InvalidArgument(
                    f"config.{name} {why}, got {getattr(self, name)!r}", field=f"config.{name}"
                )


@dataclass(frozen=True)
class TrainProgress:
    """One finished epoch.

    Attributes:
        epoch: 1-based epoch just finished.
        epochs: Maximum epochs.
        train_loss: Mean BT negative log-likelihood over the epoch's minibatches and members.
        val_log_likelihood: Mean per-pair log-likelihood (nats) of the ensemble-mean
            prediction on the held-out slice; NaN without one.
    """

    epoch: int
    epochs: int
    train_loss: float
    val_log_likelihood: float


@dataclass(frozen=True)
class EnsembleState:
    """Everything needed to predict.

    Attributes:
        config: The configuration the members were trained with.
        input_dim: Feature dimension D.
        tensors: Stacked parameters (E first, on CPU). For an MLP ensemble with
            hidden sizes H0..Hk-1: ``W{i}`` `[E, H(i-1), Hi]` (``H(-1) = D``),
            ``b{i}`` `[E, Hi]`, ``w_out`` `[E, Hk-1, 1]`, ``b_out`` `[E, 1]`.
    """

    config: EnsembleConfig
    input_dim: int
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def ensemble_size(self) -> int:
        """Number of members E."""
        return int(next(iter(self.tensors.values())).shape[0])


@dataclass(frozen=True)
class TrainResult:
    """Outcome of `train_ensemble`.

    Attributes:
        state: The trained posterior (best validation epoch per member when early stopping).
        train_loss: Mean train BT loss of the last epoch run.
        val_log_likelihood: Ensemble-mean held-out log-likelihood of the returned
            state (NaN without a held-out slice).
        epochs_run: Epochs actually run (the largest over members).
        n_labels: Labelled pairs given (train + held-out).
    """

    state: EnsembleState
    train_loss: float
    val_log_likelihood: float
    epochs_run: int
    n_labels: int


# --------------------------------------------------------------------------- math


def param_names(n_hidden: int) -> list[str]:
    """Names of the stacked tensors, in forward order."""
    names: list[str] = []
    for i in range(n_hidden):
        names += [f"W{i}", f"b{i}"]
    return [*names, "w_out", "b_out"]


def rewards(params: dict[str, torch.Tensor], x_E_M_D: torch.Tensor) -> torch.Tensor:
    """Rewards of every member on its own rows.

    Args:
        params: Stacked parameters (see `EnsembleState.tensors`).
        x_E_M_D: Member-specific inputs, or `[M, D]` shared by all members.

    Returns:
        r_E_M.
    """
    n_hidden = (len(params) - 2) // 2
    E = params["w_out"].shape[0]
    h_E_M_H = x_E_M_D if x_E_M_D.dim() == 3 else x_E_M_D.unsqueeze(0).expand(E, -1, -1)
    for i in range(n_hidden):
        h_E_M_H = torch.tanh(torch.baddbmm(params[f"b{i}"].unsqueeze(1), h_E_M_H, params[f"W{i}"]))
    return torch.baddbmm(params["b_out"].unsqueeze(1), h_E_M_H, params["w_out"]).squeeze(-1)


def bt_logits(
    params: dict[str, torch.Tensor], a_E_B_D: torch.Tensor, b_E_B_D: torch.Tensor
) -> torch.Tensor:
    """Bradley-Terry logits ``r(a) - r(b)``, both sides in one batched pass.

    Returns:
        logits_E_B.
    """
    B = a_E_B_D.shape[-2]
    r_E_M = rewards(params, torch.cat([a_E_B_D, b_E_B_D], dim=-2))
    return r_E_M[:, :B] - r_E_M[:, B:]


def bt_loss(logits_E_B: torch.Tensor, targets_B: torch.Tensor) -> torch.Tensor:
    """Per-member mean Bradley-Terry negative log-likelihood.

    ``-[t log sigmoid(z) + (1 - t) log sigmoid(-z)]`` with soft targets
    ``t = P(A preferred)`` (ties: 0.5), computed stably from logits.

    Returns:
        loss_E.
    """
    t_E_B = targets_B.to(logits_E_B.dtype).expand_as(logits_E_B)
    return bce_with_logits(logits_E_B, t_E_B, reduction="none").mean(dim=-1)


_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _member_seeds(seed: int, member: int) -> tuple[np.random.Generator, int]:
    """Member-specific data RNG and torch init seed, independent of E."""
    data_rng = np.random.default_rng([seed, 1, member])
    init_seed = int(np.random.SeedSequence([seed, 2, member]).generate_state(1, np.uint64)[0] >> 1)
    return data_rng, init_seed


def init_member(input_dim: int, hidden_sizes: Sequence[int], init_seed: int,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One member's parameters (E = 1), `torch.nn.Linear` default init U(+-1/sqrt(fan_in)).

    Returns:
        Stacked parameters with E = 1, on CPU.
    """
    g = torch.Generator().manual_seed(init_seed)
    sizes = [input_dim, *hidden_sizes, 1]
    out: dict[str, torch.Tensor] = {}
    names = param_names(len(hidden_sizes))
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        bound = 1.0 / math.sqrt(fan_in)
        W = (torch.rand(1, fan_in, fan_out, generator=g, dtype=torch.float64) * 2 - 1) * bound
        b = (torch.rand(1, fan_out, generator=g, dtype=torch.float64) * 2 - 1) * bound
        out[names[2 * i]], out[names[2 * i + 1]] = W.to(dtype), b.to(dtype)
    return out


# --------------------------------------------------------------------- validation


def _check_pairs(feats_a_N_D: np.ndarray, feats_b_N_D: np.ndarray) -> None:
    for name, arr in (("feats_a", feats_a_N_D), ("feats_b", feats_b_N_D)):
        if not isinstance(arr, np.ndarray) or arr.ndim != 2:
            raise errors.InvalidArgument(f"{name} must be a 2-D array [N, D]", field=name)
    if feats_a_N_D.shape != feats_b_N_D.shape:
        raise errors.InvalidArgument(
            f"feats_a shape {feats_a_N_D.shape} != feats_b shape {feats_b_N_D.shape}",
            field="feats_b",
        )


def upcast_features(arr: np.ndarray) -> np.ndarray:
    """Features ready for arithmetic: float16 (a FEATURE_STORAGE_FLOAT16 pool's arrays) as float32
    (exact), wider floats unchanged (no copy)."""
    if arr.dtype.kind == "f" and arr.dtype.itemsize < 4:
        return arr.astype(np.float32)
    return arr


def _check_finite(name: str, arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        raise errors.InvalidArgument(f"{name} contains NaN or infinity", field=name)


def _check_training_inputs(feats_a_N_D: np.ndarray, feats_b_N_D: np.ndarray,
                           targets_N: np.ndarray, config: EnsembleConfig, seed: int) -> None:
    config.validate()
    _check_pairs(feats_a_N_D, feats_b_N_D)
    N, D = feats_a_N_D.shape
    if N == 0 or D == 0:
        raise errors.InvalidArgument("no labelled pairs to train on", field="targets")
    targets_N = np.asarray(targets_N)
    if targets_N.shape != (N,):
        raise errors.InvalidArgument(f"targets shape {targets_N.shape} != ({N},)", field="targets")
    _check_finite("feats_a", feats_a_N_D)
    _check_finite("feats_b", feats_b_N_D)
    _check_finite("targets", targets_N)
    if ((targets_N < 0) | (targets_N > 1)).any():
        raise errors.InvalidArgument("targets must be probabilities in [0, 1]", field="targets")
    if seed < 0:
        raise errors.InvalidArgument(f"seed must be >= 0, got {seed}", field="seed")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if device == "cuda" and not torch.cuda.is_available():
        raise errors.FailedPrecondition("config.device is 'cuda' but no CUDA device is available")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------------ training


@dataclass(frozen=True)
class _Split:
    train_T: np.ndarray
    val_V: np.ndarray


def _split(N: int, val_fraction: float, seed: int) -> _Split:
    """Held-out slice shared by all members (chosen by `seed` only)."""
    n_val = math.floor(N * val_fraction)
    if n_val == 0 or n_val >= N:
        return _Split(np.arange(N), np.arange(0))
    perm = np.random.default_rng([seed, 0]).permutation(N)
    return _Split(np.sort(perm[n_val:]), np.sort(perm[:n_val]))


def _epoch_orders(rngs: Sequence[np.random.Generator], samples_E_T: np.ndarray) -> np.ndarray:
    """Each member's own shuffle of its own (bootstrap) sample, `[E, T]`."""
    return np.stack([s[rng.permutation(len(s))] for rng, s in zip(rngs, samples_E_T, strict=True)])


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _val_logits(params: dict[str, torch.Tensor], a_V_D: torch.Tensor, b_V_D: torch.Tensor,
                autocast: bool) -> torch.Tensor:
    """logits_E_V in float64 (shared inputs, chunked)."""
    outs = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for sl in _chunks(a_V_D.shape[0], PREDICT_CHUNK):
            outs.append(bt_logits(params, a_V_D[sl], b_V_D[sl]).double())
    return torch.cat(outs, dim=1)


def _ensemble_log_lik(logits_E_V: torch.Tensor, t_V: torch.Tensor) -> float:
    p_V = torch.sigmoid(logits_E_V).mean(dim=0)
    return float(log_likelihood(p_V.cpu().numpy(), t_V.cpu().numpy()).mean())


def _train_members(
    feats_a_N_D: np.ndarray,
    feats_b_N_D: np.ndarray,
    targets_N: np.ndarray,
    config: EnsembleConfig,
    members: Sequence[int],
    *,
    seed: int,
    init: EnsembleState | None,
    progress: Callable[[TrainProgress], None] | None,
    should_stop: Callable[[], bool] | None,
    dtype: torch.dtype,
) -> TrainResult:
    """Train the given members (stacked) and return them as one state."""
    N, D = feats_a_N_D.shape
    E = len(members)
    device = resolve_device(config.device)
    autocast = device.type == "cuda" and dtype == torch.float32

    split = _split(N, config.val_fraction, seed)
    n_train = len(split.train_T)
    rngs, init_seeds = zip(*(_member_seeds(seed, m) for m in members), strict=True)
    if config.bootstrap:
        samples_E_T = np.stack([split.train_T[rng.integers(0, n_train, n_train)] for rng in rngs])
    else:
        samples_E_T = np.stack([split.train_T for _ in rngs])

    # Parameters: fresh per-member init, or the previous version (warm start).
    if config.warm_start and init is not None:
        init_members = [{k: v[m : m + 1] for k, v in _check_init(init, config, D).items()}
                        for m in members]
    else:
        init_members = [init_member(D, config.hidden_sizes, s, dtype) for s in init_seeds]
    params = {
        k: torch.cat([p[k] for p in init_members]).to(device=device, dtype=dtype).requires_grad_()
        for k in param_names(len(config.hidden_sizes))
    }
    # Fused AdamW: one pass over each parameter per step instead of ~10 elementwise
    # passes; the stacked E-member tensors (42 MB at the reference shape) are far past
    # the caches, so the unfused step was memory-bound and half of a CPU training step.
    opt = torch.optim.AdamW(list(params.values()), lr=config.learning_rate,
                            weight_decay=config.weight_decay, fused=dtype in _FUSED_DTYPES)

    fa_N_D = torch.from_numpy(np.ascontiguousarray(upcast_features(feats_a_N_D))).to(device=device, dtype=dtype)
    fb_N_D = torch.from_numpy(np.ascontiguousarray(upcast_features(feats_b_N_D))).to(device=device, dtype=dtype)
    t_N = torch.from_numpy(np.asarray(targets_N, dtype=np.float64)).to(device)
    val_idx = torch.from_numpy(split.val_V).to(device)
    has_val = len(split.val_V) > 0
    if has_val:
        a_V_D, b_V_D, t_V = fa_N_D[val_idx], fb_N_D[val_idx], t_N[val_idx]

    best = {k: v.detach().clone() for k, v in params.items()}
    best_nll_E = torch.full((E,), math.inf, dtype=torch.float64, device=device)
    stale_E = torch.zeros(E, dtype=torch.long, device=device)
    active_E = torch.ones(E, dtype=torch.bool, device=device)
    train_loss = math.nan
    epochs_run = 0

    for epoch in range(1, config.epochs + 1):
        order_E_T = torch.from_numpy(_epoch_orders(rngs, samples_E_T)).to(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # no per-step sync
        n_batches = 0
        for sl in _chunks(n_train, config.batch_size):
            if should_stop is not None and should_stop():
                raise errors.Cancelled("posterior training was cancelled")
            idx_E_B = order_E_T[:, sl]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                logits_E_B = bt_logits(params, fa_N_D[idx_E_B], fb_N_D[idx_E_B])
            loss_E = bt_loss(logits_E_B.to(dtype), t_N[idx_E_B])
            opt.zero_grad(set_to_none=True)
            # Sum, not mean: each member's gradient is that of its own mean loss.
            loss_E.sum().backward()
            opt.step()
            loss_sum += loss_E.detach().mean()
            n_batches += 1
        train_loss = float(loss_sum) / max(n_batches, 1)
        epochs_run = epoch

        val_ll = math.nan
        if has_val:
            logits_E_V = _val_logits(params, a_V_D, b_V_D, autocast)
            val_ll = _ensemble_log_lik(logits_E_V, t_V)
            nll_E = bce_with_logits(
                logits_E_V, t_V.expand_as(logits_E_V), reduction="none").mean(dim=1)
            improved_E = active_E & (nll_E < best_nll_E)
            with torch.no_grad():
                for k, v in params.items():
                    best[k][improved_E] = v.detach()[improved_E]
            best_nll_E = torch.where(improved_E, nll_E, best_nll_E)
            stale_E = torch.where(improved_E, torch.zeros_like(stale_E), stale_E + 1)
            # A stopped member keeps its best snapshot even though it is still
            # carried along in the stacked update (equivalent to stopping it alone).
            active_E &= stale_E < config.patience
        if progress is not None:
            progress(TrainProgress(epoch, config.epochs, train_loss, val_ll))
        if has_val and not bool(active_E.any()):
            break

    final = best if has_val else {k: v.detach() for k, v in params.items()}
    final_val_ll = math.nan
    if has_val:
        final_val_ll = _ensemble_log_lik(_val_logits(final, a_V_D, b_V_D, autocast), t_V)
    state = EnsembleState(
        config=config,
        input_dim=D,
        tensors={k: v.detach().to("cpu").contiguous() for k, v in final.items()},
    )
    return TrainResult(state, train_loss, final_val_ll, epochs_run, N)


def _check_init(init: EnsembleState, config: EnsembleConfig, D: int) -> dict[str, torch.Tensor]:
    names = param_names(len(config.hidden_sizes))
    ok = (
        init.input_dim == D
        and set(init.tensors) == set(names)
        and tuple(init.config.hidden_sizes) == tuple(config.hidden_sizes)
        and init.ensemble_size == config.ensemble_size
    )
    if not ok:
        raise errors.InvalidArgument(
            "warm start needs a previous version with the same input dim, hidden sizes and "
            f"ensemble size (previous: D={init.input_dim}, hidden={init.config.hidden_sizes}, "
            f"E={init.ensemble_size}; now: D={D}, hidden={config.hidden_sizes}, "
            f"E={config.ensemble_size})",
            field="init",
        )
    return init.tensors


def train_ensemble(
    feats_a_N_D: np.ndarray,
    feats_b_N_D: np.ndarray,
    targets_N: np.ndarray,
    config: EnsembleConfig,
    *,
    seed: int,
    init: EnsembleState | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    dtype: torch.dtype = torch.float32,
) -> TrainResult:
    """Train all E members of the ensemble at once (stacked parameters, batched matmuls).

    Full retrain from a fresh per-member initialisation unless ``config.warm_start``
    and ``init`` is given, in which case every member continues from ``init``
    (APL online variant; fresh optimiser state). With ``config.val_fraction > 0`` a
    held-out slice drives per-member early stopping and each member's best epoch
    is restored.

    Args:
        feats_a_N_D: float32 features of (prompt + completion A) (float16 is upcast to float32).
        feats_b_N_D: float32 features of (prompt + completion B) (float16 is upcast to float32).
        targets_N: P(A preferred): 1.0, 0.0 or 0.5 (tie); any value in [0, 1] works.
        config: Hyper-parameters (``posterior`` must be ``"mlp_ensemble"``).
        seed: Non-negative seed; member e's init and data order depend only on (seed, e).
        init: Previous version, used only when ``config.warm_start``.
        progress: Called after every epoch.
        should_stop: Polled before every minibatch; training raises `errors.Cancelled`
            once it returns True.
        dtype: Parameter dtype (float64 for exactness tests).

    Returns:
        The trained posterior and its training summary.

    Raises:
        errors.InvalidArgument: Shape mismatch, NaN, no labels, bad config or init.
        errors.Cancelled: ``should_stop()`` became true.
    """
    _check_training_inputs(feats_a_N_D, feats_b_N_D, targets_N, config, seed)
    if config.posterior != "mlp_ensemble":
        raise errors.InvalidArgument(
            "train_ensemble trains feature heads; use lora.train_lora_ensemble for "
            "posterior='lora_ensemble'", field="config.posterior")
    return _train_members(feats_a_N_D, feats_b_N_D, np.asarray(targets_N), config,
                          range(config.ensemble_size), seed=seed, init=init, progress=progress,
                          should_stop=should_stop, dtype=dtype)


def train_members_sequentially(
    feats_a_N_D: np.ndarray,
    feats_b_N_D: np.ndarray,
    targets_N: np.ndarray,
    config: EnsembleConfig,
    *,
    seed: int,
    init: EnsembleState | None = None,
    should_stop: Callable[[], bool] | None = None,
    dtype: torch.dtype = torch.float32,
) -> TrainResult:
    """Reference: the same members with the same seeds as `train_ensemble`, one after another.

    Used by the tests (batched == sequential) and by ``bench/posterior.py``. The
    returned ``train_loss`` is the mean over members and ``epochs_run`` the largest.
    """
    _check_training_inputs(feats_a_N_D, feats_b_N_D, targets_N, config, seed)
    results = [
        _train_members(feats_a_N_D, feats_b_N_D, np.asarray(targets_N), config, [m], seed=seed,
                       init=init, progress=None, should_stop=should_stop, dtype=dtype)
        for m in range(config.ensemble_size)
    ]
    names = list(results[0].state.tensors)
    tensors = {k: torch.cat([r.state.tensors[k] for r in results]) for k in names}
    state = EnsembleState(config, feats_a_N_D.shape[1], tensors)
    val_ll = math.nan
    split = _split(feats_a_N_D.shape[0], config.val_fraction, seed)
    if len(split.val_V):
        probs_V_E = predict_probs(state, feats_a_N_D[split.val_V], feats_b_N_D[split.val_V])
        t_V = np.asarray(targets_N, dtype=np.float64)[split.val_V]
        val_ll = float(log_likelihood(probs_V_E.mean(axis=1), t_V).mean())
    return TrainResult(
        state,
        float(np.mean([r.train_loss for r in results])),
        val_ll,
        max(r.epochs_run for r in results),
        feats_a_N_D.shape[0],
    )


# ---------------------------------------------------------------------- prediction


def predict_probs(
    state: EnsembleState, feats_a_N_D: np.ndarray, feats_b_N_D: np.ndarray
) -> np.ndarray:
    """P(A preferred) under every member, in chunks so N = 1M fits memory.

    Args:
        state: A trained MLP ensemble.
        feats_a_N_D: Features of (prompt + completion A); float16 is upcast to float32 chunk by chunk.
        feats_b_N_D: Features of (prompt + completion B).

    Returns:
        probs_N_E, float64.

    Raises:
        errors.InvalidArgument: Shape mismatch, wrong D, NaN.
    """
    _check_pairs(feats_a_N_D, feats_b_N_D)
    N, D = feats_a_N_D.shape
    if state.input_dim != D:
        raise errors.InvalidArgument(f"feature dim {D} != posterior input dim {state.input_dim}",
                                     field="feats_a")
    if state.config.posterior != "mlp_ensemble":
        raise errors.InvalidArgument("state is not an MLP ensemble; use lora.predict_probs_lora",
                                     field="state")
    E = state.ensemble_size
    out_N_E = np.empty((N, E), dtype=np.float64)
    device = resolve_device(state.config.device)
    dtype = next(iter(state.tensors.values())).dtype
    params = {k: v.to(device) for k, v in state.tensors.items()}
    autocast = device.type == "cuda" and dtype == torch.float32
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for sl in _chunks(N, PREDICT_CHUNK):
            a_C_D, b_C_D = upcast_features(feats_a_N_D[sl]), upcast_features(feats_b_N_D[sl])
            _check_finite("feats_a", a_C_D)
            _check_finite("feats_b", b_C_D)
            a_t = torch.from_numpy(np.ascontiguousarray(a_C_D)).to(device=device, dtype=dtype)
            b_t = torch.from_numpy(np.ascontiguousarray(b_C_D)).to(device=device, dtype=dtype)
            logits_E_C = bt_logits(params, a_t, b_t).double()
            out_N_E[sl] = torch.sigmoid(logits_E_C).T.cpu().numpy()
    return out_N_E
