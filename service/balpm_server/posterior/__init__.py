"""Bayesian posterior of a Bradley-Terry preference model: a deep ensemble of reward heads.

Public API (the server depends on these names): `EnsembleConfig`, `EnsembleState`,
`TrainProgress`, `TrainResult`, `train_ensemble`, `train_members_sequentially`,
`predict_probs`, `EvalMetrics`, `evaluate`, `bald_scores`, `PosteriorStore`.
`bald_scores` is `balpm_server.bernoulli.bald`, the one BALD implementation.
The LoRA ensemble (`train_lora_ensemble`, `predict_probs_lora`, ...) lives in
`balpm_server.posterior.lora` and is imported lazily (it pulls in transformers/peft).
"""

from __future__ import annotations

from typing import Any

from balpm_server.bernoulli import bald as bald_scores
from balpm_server.posterior.ensemble import (
    EnsembleConfig,
    EnsembleState,
    TrainProgress,
    TrainResult,
    predict_probs,
    train_ensemble,
    train_members_sequentially,
)
from balpm_server.posterior.metrics import EvalMetrics, evaluate
from balpm_server.posterior.store import PosteriorStore

_LAZY_LORA = (
    "LoraEnsemble",
    "load_lora_ensemble",
    "lora_ensemble_from_state",
    "lora_ensemble_to_state",
    "predict_probs_lora",
    "train_lora_ensemble",
)

__all__ = [
    "EnsembleConfig",
    "EnsembleState",
    "EvalMetrics",
    "PosteriorStore",
    "TrainProgress",
    "TrainResult",
    "bald_scores",
    "evaluate",
    "predict_probs",
    "train_ensemble",
    "train_members_sequentially",
    *_LAZY_LORA,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_LORA:
        from balpm_server.posterior import lora

        return getattr(lora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
