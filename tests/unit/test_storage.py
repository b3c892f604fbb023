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


def test_float16_feature_store_round_trip_half_size(tmp_path: Path) -> None:
    fs16 = FeatureStore(tmp_path / "f16", dim=5, dtype=np.float16)
    fs32 = FeatureStore(tmp_path / "f32", dim=5)
    rng = np.random.default_rng(1)
    block = {k: (rng.normal(size=(4, 5)) * 100).astype(np.float32) for k in ("prompt", "a", "b")}
    block["a"][0, 0] = 65504.0  # float16's largest finite value is storable
    rows = np.array([3, 0, 1, 4])
    fs16.write_rows(rows, block)
    fs32.write_rows(rows, block)
    assert sorted(p.name for p in (tmp_path / "f16").iterdir()) == ["a.f16", "b.f16", "prompt.f16"]
    assert fs16.file_bytes() * 2 == fs32.file_bytes() == 3 * 5 * 5 * 4  # rows 0..4, 2 vs 4 bytes a value
    assert fs16.rows_stored("b") == 5
    got = fs16.read("a", 6)
    assert got.dtype == np.float16 and got.shape == (6, 5)
    for i, r in enumerate(rows):
        # float16 keeps 11 significant bits: relative error at most 2^-11 (round to nearest)
        np.testing.assert_allclose(got[r].astype(np.float32), block["a"][i], rtol=2.0**-11, atol=0)
        np.testing.assert_array_equal(got[r], block["a"][i].astype(np.float16))  # exactly numpy's rounding
    np.testing.assert_array_equal(got[2], 0)  # never written
    np.testing.assert_array_equal(got[5], 0)  # past the end
    some = fs16.read_rows("prompt", np.array([4, 9, 0]))
    assert some.dtype == np.float16
    np.testing.assert_array_equal(some[0], block["prompt"][3].astype(np.float16))
    np.testing.assert_array_equal(some[1], 0)
    np.testing.assert_array_equal(some[2], block["prompt"][1].astype(np.float16))
    # Already-float16 blocks (a restored artifact chunk) are written unchanged.
    again = FeatureStore(tmp_path / "again", dim=5, dtype=np.float16)
    again.write_rows(np.arange(5), {k: fs16.read(k, 5) for k in ("prompt", "a", "b")})
    for k in ("prompt", "a", "b"):
        np.testing.assert_array_equal(again.read(k, 5), fs16.read(k, 5))
    # The float32 store of the same pool is unchanged by the option.
    assert fs32.read("a", 5).dtype == np.float32
    assert (tmp_path / "f32" / "a.f32").exists()


def test_float16_feature_store_rejects_values_it_cannot_hold(tmp_path: Path) -> None:
    from balpm_server.storage.feature_store import FeatureOutOfRange

    fs = FeatureStore(tmp_path / "f", dim=2, dtype=np.float16)
    ok = {k: np.ones((1, 2), np.float32) for k in ("prompt", "a", "b")}
    for bad_value in (65520.0, -1e6, np.inf, np.nan):  # 65520 would round to inf
        bad = {**ok, "b": np.array([[1.0, bad_value]], np.float32)}
        with pytest.raises(FeatureOutOfRange, match="b features") as info:
            fs.write_rows(np.array([0]), bad)
        assert info.value.kind == "b"
    assert fs.rows_stored("prompt") == 0  # nothing written
    with pytest.raises(ValueError, match="float32 or float16"):
        FeatureStore(tmp_path / "g", dim=2, dtype=np.float64)


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
