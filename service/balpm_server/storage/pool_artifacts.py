"""A pool's files in the artifact store: the durable copy behind the local data dir.

With an artifact store configured (`BALPM_ARTIFACT_URL`), the data dir is a working copy
that can be lost: everything in it can be rebuilt from the database and the bucket.

- **feature chunks**: every group of feature rows the server makes durable (an upload
  chunk's client features, a featurisation group) is also stored as one immutable object
  ``pools/<key>/features/<first row>-<rows>-<nonce>.npz`` (arrays ``prompt``, ``a``, ``b``
  in the pool's feature dtype, float32 or float16, and ``rows_R``) *before* the transaction that
  commits its items (or marks them featurised) publishes its key in table ``artifacts``.
  A crash in between leaves an unpublished object, never a published key without bytes.
  `restore_features` replays the published chunks, oldest first, into a missing or short
  local feature file (a later chunk for the same rows wins: it is the committed one).
- **posterior versions**: the files of ``posterior/vNNNNNN`` are stored under
  ``pools/<key>/posterior/vNNNNNN/`` before the version is published with the pool's
  ``posterior_version``; a replica without them downloads the folder (atomically) on load.
- **kNN graphs**: a cache of the features, stored after each save, published in the
  table; a replica without a local graph takes the newest published one (and rebuilds or
  extends it as usual when it no longer matches the items).

Without an artifact store every method is a no-op: the data dir is the system of record.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from balpm_server.storage.artifacts import ArtifactNotFound, ArtifactStore
from balpm_server.storage.feature_store import KINDS, FeatureStore
from balpm_server.storage.sql_store import ARTIFACT_FEATURES, ARTIFACT_KNN, SqlStore

log = logging.getLogger(__name__)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PoolArtifacts:
    """Puts and restores pools' artifacts (all methods block: call them from worker threads).

    Args:
        store: The artifact store, or None when the data dir is the system of record.
        meta: The metadata store, where artifacts are published.
    """

    def __init__(self, store: ArtifactStore | None, meta: SqlStore) -> None:
        self.store = store
        self.meta = meta

    @property
    def enabled(self) -> bool:
        """Whether an artifact store holds the durable copy."""
        return self.store is not None

    # ---- feature chunks ------------------------------------------------------------

    def put_features(
        self, pool_key: str, rows_R: np.ndarray, feats: dict[str, np.ndarray], *, dtype: Any = np.float32
    ) -> str | None:
        """Store one group of feature rows as an object (durable when this returns); returns its key.

        The caller publishes the key in the transaction that commits the rows. The arrays
        are stored in the pool's dtype (`FeatureStore.dtype`: float32, or float16 for a
        FEATURE_STORAGE_FLOAT16 pool, whose chunks are half the size); the npz records it,
        and `restore_features` casts whatever it reads to the local store's dtype.
        """
        if self.store is None:
            return None
        buf = io.BytesIO()
        arrays = {k: np.ascontiguousarray(feats[k], dtype=dtype) for k in KINDS}
        arrays["rows_R"] = np.asarray(rows_R, dtype=np.int64)
        np.savez(buf, allow_pickle=False, **arrays)
        first = int(np.min(rows_R)) if len(rows_R) else 0
        key = f"pools/{pool_key}/features/{first:012d}-{len(rows_R)}-{uuid.uuid4().hex[:12]}.npz"
        self.store.put(key, buf.getvalue())
        return key

    def restore_features(self, pool_key: str, fs: FeatureStore, n_rows: int) -> int:
        """Fill a missing or short local feature file from the published chunks; returns chunks replayed."""
        if self.store is None or n_rows == 0 or all(fs.rows_stored(k) >= n_rows for k in KINDS):
            return 0
        keys = self.meta.artifacts_of(pool_key, ARTIFACT_FEATURES)
        for key in keys:  # float32 or float16 chunks alike: write_rows casts to the store's dtype
            with np.load(io.BytesIO(self.store.get(key)), allow_pickle=False) as chunk:
                fs.write_rows(chunk["rows_R"], {k: chunk[k] for k in KINDS})
        log.info("restored %d feature chunks of pool %s from the artifact store", len(keys), pool_key)
        return len(keys)

    # ---- posterior versions ----------------------------------------------------------

    def put_folder(self, pool_key: str, name: str, folder: Path) -> str | None:
        """Store every file of a local folder under ``pools/<key>/<name>/``; returns that prefix."""
        if self.store is None:
            return None
        prefix = f"pools/{pool_key}/{name}/"
        for path in sorted(folder.iterdir()):
            if path.is_file():
                self.store.put(prefix + path.name, path.read_bytes())
        return prefix

    def restore_folder(self, prefix: str, folder: Path) -> bool:
        """Download the objects under `prefix` into `folder` (atomically: all files or none); False if absent."""
        if self.store is None or folder.exists():
            return False
        keys = self.store.list(prefix)
        if not keys:
            return False
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".restore-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for key in keys:
                path = tmp / key[len(prefix) :]
                path.write_bytes(self.store.get(key))
                _fsync(path)
            _fsync(tmp)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not folder.exists():
                    raise  # else another thread restored it first
            _fsync(folder.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("restored %s from the artifact store", prefix)
        return True

    # ---- kNN graphs ----------------------------------------------------------------

    def put_graph(self, pool_key: str, path: Path) -> None:
        """Store and publish a saved kNN graph file (a cache: a failure is logged, not raised)."""
        if self.store is None:
            return
        key = f"pools/{pool_key}/knn/{path.stem}-{uuid.uuid4().hex[:12]}.npz"
        try:
            self.store.put(key, path.read_bytes())
            self.meta.publish_artifact(pool_key, ARTIFACT_KNN, key)
        except Exception as e:  # the graph can always be rebuilt from the features
            log.warning("kNN graph of pool %s not stored in the artifact store: %s", pool_key, e)

    def restore_graph(self, pool_key: str, path: Path) -> bool:
        """Fetch the newest published graph named like `path` when there is no local one; False if none."""
        if self.store is None or path.exists():
            return False
        wanted = f"pools/{pool_key}/knn/{path.stem}-"
        keys = [k for k in self.meta.artifacts_of(pool_key, ARTIFACT_KNN) if k.startswith(wanted)]
        if not keys:
            return False
        try:
            data = self.store.get(keys[-1])
        except ArtifactNotFound:
            return False
        tmp = path.with_suffix(".restore.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(path)
        return True

    # ---- pools -----------------------------------------------------------------------

    def delete_pool(self, pool_key: str) -> None:
        """Delete every object of a deleted pool (its rows are gone already: nothing points at them)."""
        if self.store is None:
            return
        try:
            self.store.delete_prefix(f"pools/{pool_key}/")
        except Exception as e:  # unreferenced objects only cost space
            log.warning("objects of deleted pool %s not deleted from the artifact store: %s", pool_key, e)
