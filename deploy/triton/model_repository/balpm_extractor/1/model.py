"""Triton Python-backend model: texts -> last-token and mean-pooled final hidden states.

Runs inside the Triton Python backend stub (its own interpreter, see deploy/triton/README.md),
so it imports only torch, numpy, transformers and `triton_python_backend_utils`, never balpm.

Inputs/outputs (see config.pbtxt):
    TEXT            BYTES [B, 1]   UTF-8 texts.
    LAST_TOKEN      FP32  [B, D]   final hidden state of the last non-padding token.
    MEAN_EMBEDDING  FP32  [B, D]   mean of final hidden states over non-padding tokens.

Parameters (config.pbtxt `parameters`):
    model_path         Local model folder (config, weights, tokenizer); relative paths are
                       resolved against the model's folder in the repository.
    max_length_tokens  Truncation length (default 256).
    torch_num_threads  torch intra-op threads on CPU; "0" keeps torch's default.

Features equal balpm's in-process `TransformersExtractor` (same tokenizer settings:
right padding, pad = eos when the tokenizer has no pad token; same pooling code).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

OUTPUT_NAMES = ("LAST_TOKEN", "MEAN_EMBEDDING")


def pool_hidden(hidden_N_T_D: Any, mask_N_T: Any, pooling: str) -> Any:
    """Pool token states into one vector per text.

    Copy of `balpm_server.features.transformers_extractor.pool_hidden` (this file cannot
    import balpm); tests/triton/test_triton_repository.py fails if the two drift apart.

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
    raise ValueError(f"unknown pooling {pooling!r}")


def _param(model_config: dict[str, Any], key: str, default: str) -> str:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "")
    return str(value) if value not in ("", None) else default


class TritonPythonModel:
    """Feature extractor run by the Triton Python backend (one instance per instance_group)."""

    _tokenizer: Any
    _model: Any

    def initialize(self, args: dict[str, str]) -> None:
        """Load tokenizer and model once per instance.

        Args:
            args: Triton's instance arguments (`model_config` JSON, `model_repository`,
                `model_instance_kind`, `model_instance_device_id`, ...).

        Raises:
            pb_utils.TritonModelException: Bad parameters or model folder (the model then
                fails to load and Triton reports it as not ready).
        """
        import torch
        from transformers import AutoModel, AutoTokenizer

        model_config = json.loads(args["model_config"])
        model_path = _param(model_config, "model_path", "")
        if not model_path:
            raise pb_utils.TritonModelException("parameter model_path is required")
        if not os.path.isabs(model_path):
            model_path = os.path.join(args["model_repository"], model_path)
        if not os.path.isdir(model_path):
            raise pb_utils.TritonModelException(f"model_path {model_path!r} is not a folder")
        try:
            self._max_length_tokens = int(_param(model_config, "max_length_tokens", "256"))
            num_threads = int(_param(model_config, "torch_num_threads", "0"))
        except ValueError as e:
            raise pb_utils.TritonModelException(f"bad integer parameter: {e}") from e
        if self._max_length_tokens <= 0:
            raise pb_utils.TritonModelException("max_length_tokens must be > 0")

        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            self._device = f"cuda:{int(args.get('model_instance_device_id', '0'))}"
        else:
            self._device = "cpu"
            if num_threads > 0:
                torch.set_num_threads(num_threads)

        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        model = AutoModel.from_pretrained(model_path, local_files_only=True)
        model.eval().to(self._device)
        self._tokenizer, self._model = tokenizer, model
        self._hidden_size = int(model.config.hidden_size)
        self._logger = pb_utils.Logger
        self._logger.log_info(
            f"balpm_extractor loaded {model_path} on {self._device} "
            f"(D={self._hidden_size}, max_length_tokens={self._max_length_tokens})"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        """Embed every text of a (dynamically batched) list of requests in one forward pass.

        Args:
            requests: `pb_utils.InferenceRequest`s, each with TEXT of shape [B_i, 1].

        Returns:
            One `pb_utils.InferenceResponse` per request, in order; a request whose input
            is malformed (or a failed forward pass) gets an error response, never a crash.
        """
        import torch

        responses: list[Any] = [None] * len(requests)
        texts: list[str] = []
        spans: list[tuple[int, int, int]] = []  # (request index, start, stop) into texts
        for r, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, "TEXT")
            if tensor is None:
                responses[r] = _error("input TEXT is missing")
                continue
            raw = tensor.as_numpy().reshape(-1)
            start = len(texts)
            for value in raw:
                texts.append(value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value))
            spans.append((r, start, len(texts)))

        if texts:
            try:
                enc = self._tokenizer(
                    texts,
                    padding=True,
                    truncation=True,
                    max_length=self._max_length_tokens,
                    return_tensors="pt",
                ).to(self._device)
                with torch.inference_mode():
                    hidden = self._model(**enc).last_hidden_state
                    mask = enc["attention_mask"]
                    last_N_D = pool_hidden(hidden, mask, "last_token").cpu().numpy()
                    mean_N_D = pool_hidden(hidden, mask, "mean").cpu().numpy()
            except Exception as e:  # report to the client, keep serving
                for r, _, _ in spans:
                    responses[r] = _error(f"forward pass failed: {type(e).__name__}: {e}")
                return responses
            for r, start, stop in spans:
                responses[r] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("LAST_TOKEN", np.ascontiguousarray(last_N_D[start:stop], np.float32)),
                        pb_utils.Tensor(
                            "MEAN_EMBEDDING",
                            np.ascontiguousarray(mean_N_D[start:stop], np.float32),
                        ),
                    ]
                )
        for r, resp in enumerate(responses):
            if resp is None:  # a request with zero texts
                empty = np.zeros((0, self._hidden_size), np.float32)
                responses[r] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, empty) for n in OUTPUT_NAMES]
                )
        return responses

    def finalize(self) -> None:
        """Release the model (and GPU memory) when Triton unloads the model."""
        self._model = None
        self._tokenizer = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # best effort at shutdown
            pass


def _error(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
