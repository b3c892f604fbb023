"""Versioned posterior checkpoints on disk.

Layout under ``root`` (e.g. ``<data_dir>/pools/<pool_id>/posterior``)::

    v000001/model.safetensors   stacked tensors; config + input dim in the header metadata
    v000001/manifest.json       caller's manifest (JSON object) + "version"

A version is written into a temporary folder, every file and the folder are
fsynced, and the folder is renamed into place, so a version either exists
completely or not at all. Two concurrent writers never share a number: the
rename fails for the loser, which retries with the next number.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from balpm_server import errors
from balpm_server.posterior.ensemble import EnsembleConfig, EnsembleState

FORMAT = "balpm.posterior.v1"
MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def config_to_json(config: EnsembleConfig) -> str:
    """Serialise a config (tuples become lists)."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> EnsembleConfig:
    """Inverse of `config_to_json`; unknown keys (newer writers) are ignored."""
    raw = json.loads(text)
    known = {f.name for f in dataclasses.fields(EnsembleConfig)}
    kwargs = {k: v for k, v in raw.items() if k in known}
    if "hidden_sizes" in kwargs:
        kwargs["hidden_sizes"] = tuple(int(h) for h in kwargs["hidden_sizes"])
    return EnsembleConfig(**kwargs)


class PosteriorStore:
    """Numbered, immutable posterior versions of one pool.

    Args:
        root: The pool's posterior folder (created on first save).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def folder(self, version: int) -> Path:
        """The folder of one version (it may not exist)."""
        return self._dir(version)

    @staticmethod
    def folder_name(version: int) -> str:
        """The folder name of one version (``v000001``), also its name in the artifact store."""
        return f"v{version:06d}"

    def versions(self) -> list[int]:
        """Complete versions, ascending."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in self.root.iterdir():
            m = _VERSION_DIR.match(entry.name)
            if m and (entry / MANIFEST_FILE).is_file() and (entry / MODEL_FILE).is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def latest_version(self) -> int | None:
        """Highest complete version, or None when nothing was saved."""
        versions = self.versions()
        return versions[-1] if versions else None

    def save(self, state: EnsembleState, manifest: dict[str, Any], *, min_version: int = 1) -> int:
        """Write a new version atomically.

        Args:
            state: The posterior to save.
            manifest: JSON-serialisable facts about it (seed, label count, metrics...).
            min_version: The lowest number it may take (one past the pool's published
                version: a replica whose folder lacks older versions never reuses a number).

        Returns:
            The new version number (1, 2, ...).

        Raises:
            errors.InvalidArgument: The manifest is not JSON-serialisable.
        """
        try:
            manifest_text = json.dumps(manifest, sort_keys=True, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise errors.InvalidArgument(f"manifest is not JSON-serialisable: {e}",
                                         field="manifest") from e
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.tensors.items()}
            save_file(tensors, str(tmp / MODEL_FILE), metadata={
                "format": FORMAT,
                "config": config_to_json(state.config),
                "input_dim": str(state.input_dim),
            })
            _fsync_path(tmp / MODEL_FILE)
            version = max((self.latest_version() or 0) + 1, min_version)
            while True:
                full = json.loads(manifest_text)
                full["version"] = version
                with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
                    json.dump(full, f, sort_keys=True, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_path(tmp)
                try:
                    os.rename(tmp, self._dir(version))
                except OSError:
                    if not self._dir(version).exists():
                        raise
                    version += 1  # a concurrent writer took this number
                    continue
                _fsync_path(self.root)
                return version
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def manifest(self, version: int) -> dict[str, Any]:
        """The manifest of a version alone (no tensors read).

        Raises:
            errors.NotFound: No complete version with this number.
        """
        path = self._dir(version) / MANIFEST_FILE
        if version < 1 or not path.is_file():
            raise errors.NotFound(f"posterior version {version} does not exist", field="posterior_version")
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f))

    def load(self, version: int) -> tuple[EnsembleState, dict[str, Any]]:
        """Read a version.

        Raises:
            errors.NotFound: No complete version with this number.
        """
        folder = self._dir(version)
        if version < 1 or not (folder / MANIFEST_FILE).is_file():
            raise errors.NotFound(f"posterior version {version} does not exist",
                                  field="posterior_version")
        with open(folder / MANIFEST_FILE, encoding="utf-8") as f:
            manifest = json.load(f)
        with safe_open(str(folder / MODEL_FILE), framework="pt") as st:
            meta = st.metadata() or {}
            tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
        if meta.get("format") != FORMAT:
            raise errors.FailedPrecondition(
                f"posterior version {version} has unknown format {meta.get('format')!r}")
        state = EnsembleState(config_from_json(meta["config"]), int(meta["input_dim"]), tensors)
        return state, manifest
