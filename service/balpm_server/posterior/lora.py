"""LoRA-ensemble posterior: E LoRA adapters on ONE shared causal-LM backbone.

Each member is a LoRA adapter (Hu et al., 2022) of a multi-adapter `peft.PeftModel`
plus its own scalar reward head (last-token hidden state -> linear). Members get
their own adapter/head init seed and their own bootstrap/shuffle order, as in a
deep ensemble (Lakshminarayanan et al., 2017); the frozen backbone is shared, so
E members cost one backbone in memory. The Bradley-Terry likelihood and the BALD
acquisition from the members' disagreement are those of BAL-PM (Melo et al.,
NeurIPS 2024) and APL (Muldrew et al., 2024) — here on tokens instead of frozen
features.

Unlike the MLP ensemble, members are stepped one after another within each
minibatch (``set_adapter`` switches the active adapter), then one optimiser step
updates all adapters and heads. No early stopping: every epoch runs; the
held-out log-likelihood is reported.

Shape legend:
    N  items (preference pairs)
    E  ensemble members
    B  minibatch size
    L  token length
    H  backbone hidden size
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.functional import binary_cross_entropy_with_logits as bce_with_logits

from balpm_server import errors
from balpm_server.bernoulli import log_likelihood
from balpm_server.posterior.ensemble import (
    EnsembleConfig,
    EnsembleState,
    TrainProgress,
    _member_seeds,
    _split,
    resolve_device,
)
from balpm_server.posterior.store import PosteriorStore

ADAPTER_PREFIX = "member"
HEAD_W = "head.w_E_H"
HEAD_B = "head.b_E"


@dataclass(frozen=True)
class LoraEnsemble:
    """A trained LoRA ensemble.

    Attributes:
        model: The shared backbone with E adapters (``member0`` ... ``member{E-1}``).
        tokenizer: Its tokenizer (a pad token is set when missing).
        config: The configuration it was trained with (``posterior="lora_ensemble"``).
        head_w_E_H: Reward head weights, one row per member.
        head_b_E: Reward head biases.
        train_loss: Mean train BT loss of the last epoch (NaN when not trained here).
        val_log_likelihood: Ensemble-mean held-out log-likelihood (NaN without one).
        epochs_run: Epochs run.
    """

    model: Any
    tokenizer: Any
    config: EnsembleConfig
    head_w_E_H: torch.Tensor
    head_b_E: torch.Tensor
    train_loss: float = math.nan
    val_log_likelihood: float = math.nan
    epochs_run: int = 0

    @property
    def adapter_names(self) -> list[str]:
        """Adapter names in member order."""
        return [f"{ADAPTER_PREFIX}{e}" for e in range(self.config.ensemble_size)]


# ----------------------------------------------------------------------- building


def _load_backbone(model_path_or_model: Any, tokenizer: Any) -> tuple[Any, Any]:
    if isinstance(model_path_or_model, str | Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(model_path_or_model)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except OSError as e:
            raise errors.FailedPrecondition(f"cannot load a local causal LM from {path}: {e}") from e
    else:
        model = model_path_or_model
        if tokenizer is None:
            raise errors.InvalidArgument("a tokenizer is required when passing a model object",
                                         field="tokenizer")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise errors.InvalidArgument("tokenizer has neither a pad nor an eos token",
                                         field="tokenizer")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "left"  # keep the end of long completions
    return model, tokenizer


def _lora_config(config: EnsembleConfig) -> Any:
    from peft import LoraConfig

    kwargs: dict[str, Any] = {"r": config.lora_rank, "lora_alpha": config.lora_alpha}
    return LoraConfig(**kwargs, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def _build(backbone: Any, config: EnsembleConfig, seed: int) -> Any:
    """Wrap the backbone with E adapters, each initialised under its own seed."""
    import warnings

    from peft import get_peft_model

    model: Any = None
    for e in range(config.ensemble_size):
        _, init_seed = _member_seeds(seed, e)
        name = f"{ADAPTER_PREFIX}{e}"
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPT-2 Conv1D fan_in_fan_out notice
            torch.manual_seed(init_seed)
            if model is None:
                model = get_peft_model(backbone, _lora_config(config), adapter_name=name)
            else:
                model.add_adapter(name, _lora_config(config))
    return model


def _hidden_size(model: Any) -> int:
    cfg = model.config
    for attr in ("hidden_size", "n_embd", "d_model"):
        if hasattr(cfg, attr):
            return int(getattr(cfg, attr))
    raise errors.InvalidArgument("cannot tell the backbone's hidden size", field="model")


def _init_heads(H: int, config: EnsembleConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ws, bs = [], []
    bound = 1.0 / math.sqrt(H)
    for e in range(config.ensemble_size):
        _, init_seed = _member_seeds(seed, e)
        g = torch.Generator().manual_seed(init_seed + 1)
        ws.append((torch.rand(H, generator=g) * 2 - 1) * bound)
        bs.append((torch.rand(1, generator=g) * 2 - 1) * bound)
    return torch.stack(ws), torch.cat(bs)


# ------------------------------------------------------------------------ forward


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int,
              device: torch.device) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device)}


def _last_hidden(model: Any, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Hidden state of the last real token (left or right padding), `[B, H]`."""
    out = model(**enc, output_hidden_states=True)
    h_B_L_H = out.hidden_states[-1]
    mask_B_L = enc["attention_mask"]
    pos_B_L = torch.arange(mask_B_L.shape[1], device=mask_B_L.device).expand_as(mask_B_L)
    last_B = (pos_B_L * mask_B_L).argmax(dim=1)
    return h_B_L_H[torch.arange(h_B_L_H.shape[0], device=h_B_L_H.device), last_B]


def _member_logits(ens_model: Any, tokenizer: Any, config: EnsembleConfig, w_H: torch.Tensor,
                   b_1: torch.Tensor, texts_a: Sequence[str], texts_b: Sequence[str],
                   device: torch.device) -> torch.Tensor:
    """BT logits ``r(a) - r(b)`` of the active adapter, `[B]`; A and B in one forward."""
    enc = _tokenize(tokenizer, [*texts_a, *texts_b], config.lora_max_length, device)
    autocast = device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        h_M_H = _last_hidden(ens_model, enc)
    r_M = h_M_H.float() @ w_H + b_1
    B = len(texts_a)
    return r_M[:B] - r_M[B:]


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _check_texts(texts_a: Sequence[str], texts_b: Sequence[str]) -> None:
    if len(texts_a) != len(texts_b):
        raise errors.InvalidArgument(f"{len(texts_a)} texts_a but {len(texts_b)} texts_b",
                                     field="texts_b")
    if not all(isinstance(t, str) for t in [*texts_a, *texts_b]):
        raise errors.InvalidArgument("texts must be strings", field="texts_a")


# ----------------------------------------------------------------------- training


def train_lora_ensemble(
    model_path_or_model: Any,
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    targets_N: np.ndarray,
    config: EnsembleConfig,
    *,
    seed: int,
    tokenizer: Any = None,
    progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> LoraEnsemble:
    """Train E LoRA adapters + reward heads on one shared backbone with the BT loss.

    Args:
        model_path_or_model: A local model folder (loaded with ``local_files_only``)
            or a ``transformers`` causal LM (then ``tokenizer`` is required). The
            backbone is frozen; only adapters and heads train.
        texts_a: Prompt + completion A, per pair.
        texts_b: Prompt + completion B, per pair.
        targets_N: P(A preferred) in [0, 1] (ties: 0.5).
        config: Hyper-parameters; ``lora_rank``, ``lora_alpha`` and ``lora_max_length``
            apply here, ``hidden_sizes`` and ``patience`` do not.
        seed: Non-negative seed; member e depends only on (seed, e).
        tokenizer: Tokenizer of a model object.
        progress: Called after every epoch.
        should_stop: Polled before every minibatch; raises `errors.Cancelled` when true.

    Returns:
        The trained ensemble.

    Raises:
        errors.InvalidArgument: Bad texts, targets or config.
        errors.Cancelled: ``should_stop()`` became true.
    """
    config = dataclasses.replace(config, posterior="lora_ensemble")
    config.validate()
    _check_texts(texts_a, texts_b)
    t_np = np.asarray(targets_N, dtype=np.float64)
    N = len(texts_a)
    if N == 0:
        raise errors.InvalidArgument("no labelled pairs to train on", field="targets")
    if t_np.shape != (N,) or not np.isfinite(t_np).all() or ((t_np < 0) | (t_np > 1)).any():
        raise errors.InvalidArgument("targets must be N probabilities in [0, 1]", field="targets")
    if seed < 0:
        raise errors.InvalidArgument(f"seed must be >= 0, got {seed}", field="seed")

    device = resolve_device(config.device)
    backbone, tokenizer = _load_backbone(model_path_or_model, tokenizer)
    model = _build(backbone, config, seed).to(device)
    E = config.ensemble_size
    head_w, head_b = _init_heads(_hidden_size(model), config, seed)
    head_w_E_H = head_w.to(device).requires_grad_()
    head_b_E = head_b.to(device).requires_grad_()

    split = _split(N, config.val_fraction, seed)
    n_train = len(split.train_T)
    rngs = [_member_seeds(seed, e)[0] for e in range(E)]
    samples = [split.train_T[rng.integers(0, n_train, n_train)] if config.bootstrap
               else split.train_T for rng in rngs]

    names = [f"{ADAPTER_PREFIX}{e}" for e in range(E)]
    adapter_params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in adapter_params:
        p.requires_grad_(True)  # set_adapter freezes inactive adapters; train all
    opt = torch.optim.AdamW([*adapter_params, head_w_E_H, head_b_E], lr=config.learning_rate,
                            weight_decay=config.weight_decay)
    t_N = torch.from_numpy(t_np).float().to(device)
    model.train()

    train_loss, val_ll, epochs_run = math.nan, math.nan, 0
    for epoch in range(1, config.epochs + 1):
        orders = [s[rng.permutation(len(s))] for rng, s in zip(rngs, samples, strict=True)]
        loss_sum, n_batches = 0.0, 0
        for sl in _chunks(n_train, config.batch_size):
            if should_stop is not None and should_stop():
                raise errors.Cancelled("posterior training was cancelled")
            opt.zero_grad(set_to_none=True)
            batch_loss = 0.0
            for e, name in enumerate(names):
                model.base_model.set_adapter(name)
                for p in adapter_params:
                    p.requires_grad_(True)
                idx_B = orders[e][sl]
                logits_B = _member_logits(model, tokenizer, config, head_w_E_H[e], head_b_E[e:e + 1],
                                          [texts_a[i] for i in idx_B], [texts_b[i] for i in idx_B],
                                          device)
                loss = bce_with_logits(logits_B, t_N[torch.from_numpy(idx_B).to(device)])
                loss.backward()  # each member's own graph; grads land on its adapter/head only
                batch_loss += float(loss.detach()) / E
            opt.step()
            loss_sum += batch_loss
            n_batches += 1
        train_loss, epochs_run = loss_sum / max(n_batches, 1), epoch
        ens = LoraEnsemble(model, tokenizer, config, head_w_E_H.detach(), head_b_E.detach())
        if len(split.val_V):
            probs_V_E = predict_probs_lora(ens, [texts_a[i] for i in split.val_V],
                                           [texts_b[i] for i in split.val_V])
            model.train()
            val_ll = float(log_likelihood(probs_V_E.mean(axis=1), t_np[split.val_V]).mean())
        if progress is not None:
            progress(TrainProgress(epoch, config.epochs, train_loss, val_ll))
    model.eval()
    return LoraEnsemble(model, tokenizer, config, head_w_E_H.detach().cpu(),
                        head_b_E.detach().cpu(), train_loss, val_ll, epochs_run)


def predict_probs_lora(ens: LoraEnsemble, texts_a: Sequence[str], texts_b: Sequence[str],
                       *, batch_size: int = 64) -> np.ndarray:
    """P(A preferred) under every member.

    Returns:
        probs_N_E, float64.
    """
    _check_texts(texts_a, texts_b)
    N, E = len(texts_a), ens.config.ensemble_size
    out_N_E = np.empty((N, E), dtype=np.float64)
    device = next(ens.model.parameters()).device
    was_training = ens.model.training
    ens.model.eval()
    with torch.inference_mode():
        for e, name in enumerate(ens.adapter_names):
            ens.model.base_model.set_adapter(name)
            w_H, b_1 = ens.head_w_E_H[e].to(device), ens.head_b_E[e:e + 1].to(device)
            for sl in _chunks(N, batch_size):
                logits = _member_logits(ens.model, ens.tokenizer, ens.config, w_H, b_1,
                                        texts_a[sl], texts_b[sl], device)
                out_N_E[sl, e] = torch.sigmoid(logits.double()).cpu().numpy()
    if was_training:
        ens.model.train()
    return out_N_E


# -------------------------------------------------------------------- persistence


def lora_ensemble_to_state(ens: LoraEnsemble) -> EnsembleState:
    """Adapters + heads as an `EnsembleState` (``PosteriorStore`` saves it like any other).

    Tensor names: ``adapter.member{e}.<peft key>`` and ``head.w_E_H`` / ``head.b_E``.
    """
    from peft import get_peft_model_state_dict

    tensors: dict[str, torch.Tensor] = {
        HEAD_W: ens.head_w_E_H.detach().cpu().contiguous(),
        HEAD_B: ens.head_b_E.detach().cpu().contiguous(),
    }
    for name in ens.adapter_names:
        sd = get_peft_model_state_dict(ens.model, adapter_name=name)
        for k, v in sd.items():
            tensors[f"adapter.{name}.{k}"] = v.detach().cpu().contiguous()
    return EnsembleState(dataclasses.replace(ens.config, posterior="lora_ensemble"),
                         int(ens.head_w_E_H.shape[1]), tensors)


def lora_ensemble_from_state(state: EnsembleState, model_path_or_model: Any, *,
                             tokenizer: Any = None) -> LoraEnsemble:
    """Rebuild a LoRA ensemble on a (fresh) backbone from `lora_ensemble_to_state` output."""
    from peft import set_peft_model_state_dict

    if state.config.posterior != "lora_ensemble" or HEAD_W not in state.tensors:
        raise errors.InvalidArgument("state is not a LoRA ensemble", field="state")
    backbone, tokenizer = _load_backbone(model_path_or_model, tokenizer)
    if _hidden_size(backbone) != state.input_dim:
        raise errors.InvalidArgument(
            f"backbone hidden size {_hidden_size(backbone)} != saved {state.input_dim}",
            field="model")
    model = _build(backbone, state.config, seed=0)
    device = resolve_device(state.config.device)
    for e in range(state.config.ensemble_size):
        name = f"{ADAPTER_PREFIX}{e}"
        prefix = f"adapter.{name}."
        sd = {k[len(prefix):]: v for k, v in state.tensors.items() if k.startswith(prefix)}
        set_peft_model_state_dict(model, sd, adapter_name=name)
    model.to(device).eval()
    return LoraEnsemble(model, tokenizer, state.config, state.tensors[HEAD_W],
                        state.tensors[HEAD_B])


def load_lora_ensemble(store: PosteriorStore, version: int, model_path_or_model: Any, *,
                       tokenizer: Any = None) -> tuple[LoraEnsemble, dict[str, Any]]:
    """Load a saved version of a LoRA ensemble onto a backbone (see `PosteriorStore`)."""
    state, manifest = store.load(version)
    return lora_ensemble_from_state(state, model_path_or_model, tokenizer=tokenizer), manifest
