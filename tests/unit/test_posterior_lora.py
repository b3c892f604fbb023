"""LoRA-ensemble posterior on a tiny randomly initialised GPT-2 built in code (no downloads)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from balpm_server import errors
from balpm_server.posterior import EnsembleConfig, PosteriorStore, TrainProgress
from balpm_server.posterior.lora import (
    load_lora_ensemble,
    lora_ensemble_to_state,
    predict_probs_lora,
    train_lora_ensemble,
)

WORDS = ["good", "bad", "great", "awful", "answer", "the", "is", "question", "what", "fine"]
CONFIG = EnsembleConfig(ensemble_size=3, epochs=2, batch_size=8, learning_rate=5e-3,
                        val_fraction=0.25, device="cpu", posterior="lora_ensemble", lora_rank=4,
                        lora_alpha=8.0, lora_max_length=16)


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def _model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(WORDS) + 2, n_positions=32,
                     bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(cfg)


def _pairs(n: int, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    good, bad = ["good", "great", "fine"], ["bad", "awful"]
    a, b, t = [], [], []
    for _ in range(n):
        g, w = str(rng.choice(good)), str(rng.choice(bad))
        if rng.random() < 0.5:
            a.append(f"what is the question the answer is {g}")
            b.append(f"what is the question the answer is {w}")
            t.append(1.0)
        else:
            a.append(f"what is the question the answer is {w}")
            b.append(f"what is the question the answer is {g}")
            t.append(0.0)
    return a, b, np.array(t)


@pytest.fixture(scope="module")
def trained() -> Iterator[Any]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: OpenMP wake-ups dominate on a busy 2-core box
    a, b, t = _pairs(32, seed=0)
    seen: list[TrainProgress] = []
    ens = train_lora_ensemble(_model(), a, b, t, CONFIG, seed=1, tokenizer=_tokenizer(),
                              progress=seen.append)
    yield ens, seen
    torch.set_num_threads(before)


def test_lora_ensemble_trains_and_members_differ(trained: Any) -> None:
    ens, seen = trained
    assert [p.epoch for p in seen] == [1, 2]
    assert math.isfinite(ens.train_loss) and math.isfinite(ens.val_log_likelihood)
    a, b, _ = _pairs(10, seed=5)
    probs_N_E = predict_probs_lora(ens, a, b)
    assert probs_N_E.shape == (10, 3) and probs_N_E.dtype == np.float64
    assert ((probs_N_E > 0) & (probs_N_E < 1)).all()
    assert np.ptp(probs_N_E, axis=1).max() > 1e-4  # members disagree
    # Swapping sides gives 1 - p (BT is antisymmetric).
    np.testing.assert_allclose(predict_probs_lora(ens, b, a), 1 - probs_N_E, atol=1e-5)
    # One shared backbone with one adapter per member, backbone frozen.
    assert sorted(ens.model.peft_config) == ["member0", "member1", "member2"]
    trainable = {n for n, p in ens.model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)


def test_lora_adapters_are_trained(trained: Any) -> None:
    ens, _ = trained
    lora_b = [p for n, p in ens.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # B starts at zero


def test_lora_save_load_round_trip(trained: Any, tmp_path: Path) -> None:
    ens, _ = trained
    store = PosteriorStore(tmp_path / "posterior")
    version = store.save(lora_ensemble_to_state(ens), {"base_model": "tiny-gpt2"})
    loaded, manifest = load_lora_ensemble(store, version, _model(), tokenizer=_tokenizer())
    assert manifest["base_model"] == "tiny-gpt2"
    a, b, _ = _pairs(6, seed=7)
    np.testing.assert_allclose(predict_probs_lora(loaded, a, b), predict_probs_lora(ens, a, b),
                               atol=1e-6)


def test_lora_local_path_and_cancel(tmp_path: Path) -> None:
    _model().save_pretrained(tmp_path / "m")
    _tokenizer().save_pretrained(tmp_path / "m")
    a, b, t = _pairs(8, seed=3)
    cfg = dataclasses.replace(CONFIG, epochs=1, ensemble_size=2, val_fraction=0.0)
    ens = train_lora_ensemble(str(tmp_path / "m"), a, b, t, cfg, seed=0)
    assert predict_probs_lora(ens, a, b).shape == (8, 2)
    with pytest.raises(errors.Cancelled):
        train_lora_ensemble(_model(), a, b, t, cfg, seed=0, tokenizer=_tokenizer(),
                            should_stop=lambda: True)
    with pytest.raises(errors.InvalidArgument):
        train_lora_ensemble(_model(), a, b[:-1], t, cfg, seed=0, tokenizer=_tokenizer())
