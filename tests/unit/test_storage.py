"""Storage: feature rows round-trip at fixed offsets; settings parse from the environment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from balpm_server.settings import Settings
from balpm_server.storage import FeatureStore


def test_feature_rows_round_trip_out_of_order(tmp_path: Path) -> None:
    fs = FeatureStore(tmp_path / "f", dim=3)
    rng = np.random.default_rng(0)
    block = {k: rng.normal(size=(4, 3)).astype(np.float32) for k in ("prompt", "a", "b")}
    rows = np.array([5, 1, 2, 0])
    fs.write_rows(rows, block)
    got = fs.read("a", 6)
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(got[r], block["a"][i])
    np.testing.assert_array_equal(got[3], np.zeros(3, dtype=np.float32))  # never written


def test_feature_store_rejects_wrong_shape(tmp_path: Path) -> None:
    fs = FeatureStore(tmp_path / "f", dim=3)
    with pytest.raises(ValueError, match="shape"):
        fs.write_rows(np.array([0]), {k: np.zeros((1, 2), np.float32) for k in ("prompt", "a", "b")})


def test_settings_read_env_and_overrides_win() -> None:
    s = Settings.from_env({"BALPM_PORT": "6000", "BALPM_INSECURE": "true", "BALPM_BETA_UNKNOWN": "1"}, host="0.0.0.0")
    assert (s.port, s.insecure, s.host) == (6000, True, "0.0.0.0")
    assert Settings.env_names()["data_dir"] == "BALPM_DATA_DIR"
    with pytest.raises(ValueError, match="BALPM_PORT"):
        Settings.from_env({"BALPM_PORT": "many"})


def test_default_model_path_points_at_weights() -> None:
    from balpm_server.settings import default_model_path

    path = Path(default_model_path())
    assert (path / "config.json").exists() and any(path.glob("*.safetensors"))
