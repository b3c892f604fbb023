"""Feature arrays on disk: one float32 file per kind, row r at byte offset r * D * 4.

Kinds: ``prompt`` (drives the kNN entropy term), ``a`` and ``b`` (prompt +
completion, inputs of the reward heads). Rows are written with ``pwrite`` and
fsynced before the caller marks them featurised in SQLite, so a crash never
leaves a row marked done without its bytes on disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

KINDS = ("prompt", "a", "b")


class FeatureStore:
    """Fixed-width float32 feature rows of one pool.

    Args:
        folder: The pool's feature folder (created if missing).
        dim: Feature dimension D.
    """

    def __init__(self, folder: Path, dim: int) -> None:
        if dim <= 0:
            raise ValueError(f"feature dim must be positive, got {dim}")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.dim = dim

    def _path(self, kind: str) -> Path:
        return self.folder / f"{kind}.f32"

    def write_rows(self, rows_R: np.ndarray, feats: dict[str, np.ndarray]) -> None:
        """Write rows of every kind and fsync them.

        Args:
            rows_R: int64 row numbers (need not be contiguous).
            feats: kind -> float32 `[R, D]` array, for every kind in `KINDS`.
        """
        for kind in KINDS:
            block_R_D = np.ascontiguousarray(feats[kind], dtype=np.float32)
            if block_R_D.shape != (len(rows_R), self.dim):
                raise ValueError(f"{kind} features have shape {block_R_D.shape}, expected {(len(rows_R), self.dim)}")
            fd = os.open(self._path(kind), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                row_bytes = self.dim * 4
                order = np.argsort(rows_R)
                start = 0
                # Coalesce runs of consecutive rows into one pwrite each.
                while start < len(order):
                    end = start + 1
                    while end < len(order) and rows_R[order[end]] == rows_R[order[end - 1]] + 1:
                        end += 1
                    chunk = block_R_D[order[start:end]]
                    os.pwrite(fd, chunk.tobytes(), int(rows_R[order[start]]) * row_bytes)
                    start = end
                os.fsync(fd)
            finally:
                os.close(fd)

    def rows_stored(self, kind: str) -> int:
        """How many rows the local file of a kind holds (0 when it is missing)."""
        path = self._path(kind)
        return path.stat().st_size // (self.dim * 4) if path.exists() else 0

    def read(self, kind: str, n_rows: int) -> np.ndarray:
        """Read the first `n_rows` rows of a kind (missing rows read as zeros).

        Returns:
            float32 `[n_rows, D]`.
        """
        out_N_D = np.zeros((n_rows, self.dim), dtype=np.float32)
        path = self._path(kind)
        if n_rows == 0 or not path.exists():
            return out_N_D
        raw = np.fromfile(path, dtype=np.float32, count=n_rows * self.dim)
        usable = (raw.size // self.dim) * self.dim
        out_N_D.reshape(-1)[:usable] = raw[:usable]
        return out_N_D

    def read_rows(self, kind: str, rows_R: np.ndarray) -> np.ndarray:
        """Read the given rows of a kind (rows past the end of the file read as zeros).

        Only those rows are read (a memory map), whatever their spread.

        Returns:
            float32 `[R, D]`.
        """
        rows_R = np.asarray(rows_R, dtype=np.int64)
        out_R_D = np.zeros((len(rows_R), self.dim), dtype=np.float32)
        path = self._path(kind)
        if not len(rows_R) or not path.exists():
            return out_R_D
        n_file = path.stat().st_size // (self.dim * 4)
        present_R = (rows_R >= 0) & (rows_R < n_file)
        if present_R.any():
            stored_F_D = np.memmap(path, dtype=np.float32, mode="r", shape=(n_file, self.dim))
            out_R_D[present_R] = stored_F_D[rows_R[present_R]]
            del stored_F_D
        return out_R_D

    def delete(self) -> None:
        """Remove the folder."""
        shutil.rmtree(self.folder, ignore_errors=True)
