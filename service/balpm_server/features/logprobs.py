"""Completion log-probabilities under local causal LMs, for the APL strategies.

APL (Muldrew et al., "Active Preference Learning for Large Language Models", 2024)
scores a pair by the DPO implicit reward r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)).
This module computes log pi(y|x) = sum over completion tokens of log p(token | prefix)
for a policy and a reference model loaded from local folders.

Shapes: N pairs, T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from balpm_server.features.transformers_extractor import pick_device


class CompletionScorer:
    """Sums completion-token log-probabilities under one causal LM.

    Args:
        model_path: Local folder of a causal LM with its tokenizer.
        max_length_tokens: Truncation length of prompt + completion (prompt is cut from the left).
        batch_size: Sequences per forward pass.
        device: "auto", "cpu" or "cuda".
    """

    def __init__(
        self, model_path: str, *, max_length_tokens: int = 512, batch_size: int = 16, device: str = "auto"
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True).eval().to(self.device)
        self.max_length = max_length_tokens
        self.batch_size = batch_size

    def _encode(self, prompt: str, completion: str) -> tuple[list[int], int]:
        p_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"][: self.max_length - 1]
        keep = max(1, self.max_length - len(c_ids))
        p_ids = p_ids[-keep:] or [self.tokenizer.eos_token_id or 0]
        return p_ids + c_ids, len(p_ids)

    def logprobs(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Return float64 `logp_N`: sum of log p(completion tokens | prompt) in nats."""
        import torch

        out_N = np.zeros(len(prompts), dtype=np.float64)
        encoded = [self._encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(encoded[i][0]) for i in rows)
            ids_B_T = torch.full((len(rows), width), pad, dtype=torch.long)
            mask_B_T = torch.zeros((len(rows), width), dtype=torch.long)
            target_B_T = torch.zeros((len(rows), width), dtype=torch.bool)
            for b, i in enumerate(rows):
                ids, n_prompt = encoded[i]
                ids_B_T[b, : len(ids)] = torch.tensor(ids)
                mask_B_T[b, : len(ids)] = 1
                target_B_T[b, n_prompt : len(ids)] = True
            with torch.inference_mode():
                logits_B_T_V = self.model(
                    input_ids=ids_B_T.to(self.device), attention_mask=mask_B_T.to(self.device)
                ).logits
                logp_B_T_V = torch.log_softmax(logits_B_T_V.float()[:, :-1], dim=-1)
                tok_B_T = torch.gather(logp_B_T_V, 2, ids_B_T[:, 1:].to(self.device).unsqueeze(-1)).squeeze(-1)
                summed_B = (tok_B_T * target_B_T[:, 1:].to(self.device)).sum(dim=1)
            out_N[rows] = summed_B.double().cpu().numpy()
        return out_N


def apl_logprobs(
    policy_path: str,
    reference_path: str,
    prompts: Sequence[str],
    completions_a: Sequence[str],
    completions_b: Sequence[str],
    *,
    device: str = "auto",
    max_length_tokens: int = 512,
) -> np.ndarray:
    """Policy and reference log-probabilities of both completions.

    Returns:
        float64 `[N, 4]`: logp_policy_a, logp_policy_b, logp_ref_a, logp_ref_b.
    """
    cols = []
    for path in (policy_path, reference_path):
        scorer = CompletionScorer(path, device=device, max_length_tokens=max_length_tokens)
        cols += [scorer.logprobs(prompts, completions_a), scorer.logprobs(prompts, completions_b)]
        del scorer
    return np.stack(cols, axis=1)
