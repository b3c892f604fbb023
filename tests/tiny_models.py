"""Tiny models built in code for tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path


def tiny_causal_lm(folder: Path, seed: int) -> str:
    """Save a random 2-layer GPT-2 with a word-level tokenizer built in code."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(40)] + ["prompt", "a", "b", "it", "-", "0", "1", "2"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=64, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)
