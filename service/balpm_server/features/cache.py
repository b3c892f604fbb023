"""A persistent cache in front of any `FeatureExtractor`, keyed by (extractor name, text).

Re-uploading the same texts (a second simulation, a pool re-created after a delete)
then costs a SQLite look-up instead of a forward pass. Only texts missing from the
cache reach the wrapped extractor, in one call so that its length sorting and
batching still apply.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from balpm_server.features.base import FeatureExtractor
from balpm_server.storage.vector_cache import VectorCache


class CachedExtractor:
    """Wraps an extractor with an on-disk vector cache.

    Args:
        inner: The extractor doing the real work.
        path: SQLite file of the cache (`storage.vector_cache.VectorCache`).
    """

    def __init__(self, inner: FeatureExtractor, path: Path) -> None:
        self.inner = inner
        self._cache = VectorCache(path)
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        """The wrapped extractor's name (the cache is transparent)."""
        return self.inner.name

    async def dim(self) -> int:
        """The wrapped extractor's dimension."""
        return await self.inner.dim()

    def _key(self, text: str) -> bytes:
        return hashlib.sha256(f"{self.inner.name}\x1f{text}".encode()).digest()

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts, computing only those not cached."""
        keys = [self._key(t) for t in texts]
        found = await asyncio.to_thread(self._cache.get, keys)
        missing = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        fresh_M_D = await self.inner.embed([texts[i] for i in missing]) if missing else None
        dim = (
            fresh_M_D.shape[1] if fresh_M_D is not None else np.frombuffer(next(iter(found.values())), np.float32).size
        )
        out_N_D = np.empty((len(texts), dim), dtype=np.float32)
        for i, k in enumerate(keys):
            if k in found:
                out_N_D[i] = np.frombuffer(found[k], dtype=np.float32)
        if fresh_M_D is not None:
            out_N_D[missing] = fresh_M_D
            await asyncio.to_thread(
                self._cache.put, [(keys[i], fresh_M_D[j].astype(np.float32).tobytes()) for j, i in enumerate(missing)]
            )
        return out_N_D

    async def close(self) -> None:
        """Close the wrapped extractor and the cache."""
        await self.inner.close()
        self._cache.close()
