"""The `FeatureExtractor` interface and the factory that picks an implementation.

Shapes: N texts, D feature dimension. Features are float32 `[N, D]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from balpm_server.settings import Settings


@runtime_checkable
class FeatureExtractor(Protocol):
    """Turns texts into fixed-size float32 vectors.

    Implementations: in-process `transformers` (`TransformersExtractor`), a Triton
    Inference Server (`TritonExtractor`). Client-supplied vectors bypass extractors.
    """

    @property
    def name(self) -> str:
        """Short identifier stored with each pool (e.g. "transformers:/path")."""
        ...

    async def dim(self) -> int:
        """Return the output dimension D (may contact the backend).

        Raises:
            balpm_server.errors.Unavailable: The backend is not reachable or not ready.
        """
        ...

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Args:
            texts: N strings.

        Returns:
            float32 array `feats_N_D`.

        Raises:
            balpm_server.errors.Unavailable: The backend failed transiently.
        """
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


def build_extractor(settings: Settings) -> FeatureExtractor:
    """Create the extractor the settings ask for.

    Args:
        settings: Server settings (`extractor`, `model_path`, `triton_*`).

    Returns:
        A ready-to-use extractor (model loading may be lazy).

    Raises:
        ValueError: Unknown `settings.extractor`.
    """
    if settings.extractor == "transformers":
        from balpm_server.features.transformers_extractor import TransformersExtractor

        return TransformersExtractor(
            settings.model_path,
            pooling=settings.pooling,
            max_length_tokens=settings.max_length_tokens,
            batch_size=settings.extract_batch_size,
            device=settings.device,
        )
    if settings.extractor == "triton":
        from balpm_server.features.triton_extractor import TritonExtractor

        return TritonExtractor(
            settings.triton_url,
            settings.triton_model,
            output_name=settings.triton_output,
            timeout_s=settings.triton_timeout_s,
            max_in_flight=settings.triton_max_in_flight,
            batch_size=settings.extract_batch_size,
        )
    raise ValueError(f"unknown extractor {settings.extractor!r} (expected 'transformers' or 'triton')")
