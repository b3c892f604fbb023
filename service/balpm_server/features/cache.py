"""A persistent cache in front of any `FeatureExtractor`, keyed by (extractor name, text).

Re-uploading the same texts (a second simulation, a pool re-created after a delete)
then costs a SQLite look-up instead of a forward pass. Only texts missing from the
cache reach the wrapped extractor, in one call so that its length sorting and
batching still apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from balpm_server.features.base import FeatureExtractor

log = logging.getLogger(__name__)


class CachedExtractor:
    """Wraps an extractor with an on-disk vector cache.

    Args:
        inner: The extractor doing the real work.
        path: SQLite file of the cache.
    """

    def __init__(self, inner: FeatureExtractor, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.inner = inner
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vec BLOB NOT NULL)")
        self._lock = threading.Lock()
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

    def _get(self, keys: list[bytes]) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                out.update(self._conn.execute(f"SELECT key, vec FROM vectors WHERE key IN ({marks})", chunk))
        return out

    def _put(self, rows: list[tuple[bytes, bytes]]) -> None:
        """Store vectors; best effort: a failed write (full or read-only disk) only loses cache entries."""
        with self._lock:
            try:
                self._conn.execute("BEGIN")
                self._conn.executemany("INSERT OR REPLACE INTO vectors (key, vec) VALUES (?, ?)", rows)
                self._conn.execute("COMMIT")
            except sqlite3.Error as e:
                if self._conn.in_transaction:  # SQLite may or may not have rolled back itself
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                log.warning("feature cache not updated (%s); these texts are embedded again next time", e)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts, computing only those not cached."""
        keys = [self._key(t) for t in texts]
        found = await asyncio.to_thread(self._get, keys)
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
                self._put, [(keys[i], fresh_M_D[j].astype(np.float32).tobytes()) for j, i in enumerate(missing)]
            )
        return out_N_D

    async def close(self) -> None:
        """Close the wrapped extractor and the cache."""
        await self.inner.close()
        with self._lock:
            self._conn.close()
