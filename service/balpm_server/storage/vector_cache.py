"""The on-disk vector cache of `features.cache.CachedExtractor`: SQLite, key -> float32 bytes.

Thread-safe (one connection behind a lock); writes are best effort: a failed write (a full
or read-only disk) only loses cache entries and is logged, never raised.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_LOOKUP_CHUNK = 500  # keys per SELECT (below SQLite's bound-parameter limit)


class VectorCache:
    """Vectors by key in one SQLite file (WAL).

    Args:
        path: SQLite file of the cache (created with its folder).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vec BLOB NOT NULL)")
        self._lock = threading.Lock()

    def get(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        """The stored vectors of those keys that are cached."""
        out: dict[bytes, bytes] = {}
        with self._lock:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = list(keys[start : start + _LOOKUP_CHUNK])
                marks = ",".join("?" * len(chunk))
                out.update(self._conn.execute(f"SELECT key, vec FROM vectors WHERE key IN ({marks})", chunk))
        return out

    def put(self, rows: Sequence[tuple[bytes, bytes]]) -> None:
        """Store (key, vector bytes) pairs in one transaction; best effort (see the module doc)."""
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

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()
