"""Feature arrays on disk: one file per kind, row r at byte offset r * D * itemsize.

Kinds: ``prompt`` (drives the kNN entropy term), ``a`` and ``b`` (prompt +
completion, inputs of the reward heads). Rows are written with ``pwrite`` and
fsynced before the caller marks them featurised in SQLite, so a crash never
leaves a row marked done without its bytes on disk.

A pool stores float32 (``<kind>.f32``, 4 bytes per value, the default) or float16
(``<kind>.f16``, 2 bytes per value: `PoolSettings.feature_storage` FLOAT16). `read` and
`read_rows` return the stored dtype, so a float16 pool's arrays stay half the size in
memory too; whoever computes with them upcasts (float16 -> float32 is exact).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("prompt", "a", "b")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger magnitudes round to inf
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}
_READ_CHUNK_BYTES = 1 << 26  # bytes per read() call when loading a whole file


class FeatureOutOfRange(ValueError):
    """Feature values a store cannot hold (beyond float16's range, or not finite).

    Attributes:
        kind: The feature kind ("prompt", "a", "b").
        max_abs: The largest magnitude found (inf or NaN for non-finite values).
    """

    def __init__(self, kind: str, max_abs: float, limit: float) -> None:
        super().__init__(
            f"{kind} features have a value of magnitude {max_abs:.6g}; this pool stores float16 features, "
            f"which hold magnitudes up to {limit:g}"
        )
        self.kind = kind
        self.max_abs = max_abs


def storable_max_abs(dtype: Any) -> float:
    """The largest |value| a store of `dtype` keeps finite (inf for float32: client features are bounded elsewhere)."""
    return FLOAT16_MAX if np.dtype(dtype) == np.float16 else float("inf")


class FeatureStore:
    """Fixed-width feature rows of one pool, float32 or float16.

    Args:
        folder: The pool's feature folder (created if missing).
        dim: Feature dimension D.
        dtype: The stored dtype, ``np.float32`` (default, ``<kind>.f32`` files) or
            ``np.float16`` (``<kind>.f16``).
    """

    def __init__(self, folder: Path, dim: int, dtype: Any = np.float32) -> None:
        if dim <= 0:
            raise ValueError(f"feature dim must be positive, got {dim}")
        dt = np.dtype(dtype)
        if dt not in _SUFFIX:
            raise ValueError(f"feature dtype must be float32 or float16, got {dt}")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.dim = dim
        self.dtype = dt
        self._row_bytes = dim * dt.itemsize

    def _path(self, kind: str) -> Path:
        return self.folder / f"{kind}.{_SUFFIX[self.dtype]}"

    def check_storable(self, feats: dict[str, np.ndarray]) -> None:
        """Raise `FeatureOutOfRange` when a float16 store would turn a value into inf (no-op for float32).

        Args:
            feats: kind -> `[R, D]` values (any float dtype), for the kinds present.
        """
        limit = storable_max_abs(self.dtype)
        if limit == float("inf"):
            return
        for kind in KINDS:
            if kind not in feats:
                continue
            block = np.asarray(feats[kind])
            if not block.size:
                continue
            max_abs = float(np.max(np.abs(block)))
            if not max_abs <= limit:  # NaN included
                raise FeatureOutOfRange(kind, max_abs, limit)

    def write_rows(self, rows_R: np.ndarray, feats: dict[str, np.ndarray]) -> None:
        """Write rows of every kind (cast to the stored dtype) and fsync them.

        Args:
            rows_R: int64 row numbers (need not be contiguous).
            feats: kind -> float `[R, D]` array, for every kind in `KINDS`.

        Raises:
            FeatureOutOfRange: A float16 store was given a value beyond 65504 in magnitude
                (nothing is written).
            ValueError: A block of the wrong shape.
        """
        self.check_storable(feats)
        for kind in KINDS:
            block_R_D = np.ascontiguousarray(feats[kind], dtype=self.dtype)
            if block_R_D.shape != (len(rows_R), self.dim):
                raise ValueError(f"{kind} features have shape {block_R_D.shape}, expected {(len(rows_R), self.dim)}")
            fd = os.open(self._path(kind), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                order = np.argsort(rows_R)
                start = 0
                # Coalesce runs of consecutive rows into one pwrite each.
                while start < len(order):
                    end = start + 1
                    while end < len(order) and rows_R[order[end]] == rows_R[order[end - 1]] + 1:
                        end += 1
                    chunk = block_R_D[order[start:end]]
                    os.pwrite(fd, chunk.tobytes(), int(rows_R[order[start]]) * self._row_bytes)
                    start = end
                os.fsync(fd)
            finally:
                os.close(fd)

    def rows_stored(self, kind: str) -> int:
        """How many rows the local file of a kind holds (0 when it is missing)."""
        path = self._path(kind)
        return path.stat().st_size // self._row_bytes if path.exists() else 0

    def file_bytes(self) -> int:
        """Bytes of the three local feature files together."""
        return sum(self._path(k).stat().st_size for k in KINDS if self._path(k).exists())

    def read(self, kind: str, n_rows: int) -> np.ndarray:
        """Read the first `n_rows` rows of a kind (missing rows read as zeros).

        Read straight into the result (no second copy of the file in memory).

        Returns:
            `[n_rows, D]` in the stored dtype (float32 or float16).
        """
        out_N_D = np.zeros((n_rows, self.dim), dtype=self.dtype)
        path = self._path(kind)
        if n_rows == 0 or not path.exists():
            return out_N_D
        usable = min(n_rows, path.stat().st_size // self._row_bytes) * self._row_bytes
        buf = out_N_D.reshape(-1).view(np.uint8).data[:usable]
        with open(path, "rb", buffering=0) as f:
            at = 0
            while at < usable:
                got = f.readinto(buf[at : min(usable, at + _READ_CHUNK_BYTES)])
                if not got:  # the file shrank meanwhile: the rest stays zeros
                    break
                at += got
        return out_N_D

    def read_rows(self, kind: str, rows_R: np.ndarray) -> np.ndarray:
        """Read the given rows of a kind (rows past the end of the file read as zeros).

        Only those rows are read (a memory map), whatever their spread.

        Returns:
            `[R, D]` in the stored dtype (float32 or float16).
        """
        rows_R = np.asarray(rows_R, dtype=np.int64)
        out_R_D = np.zeros((len(rows_R), self.dim), dtype=self.dtype)
        path = self._path(kind)
        if not len(rows_R) or not path.exists():
            return out_R_D
        n_file = path.stat().st_size // self._row_bytes
        present_R = (rows_R >= 0) & (rows_R < n_file)
        if present_R.any():
            stored_F_D = np.memmap(path, dtype=self.dtype, mode="r", shape=(n_file, self.dim))
            out_R_D[present_R] = stored_F_D[rows_R[present_R]]
            del stored_F_D
        return out_R_D

    def delete(self) -> None:
        """Remove the folder."""
        shutil.rmtree(self.folder, ignore_errors=True)
