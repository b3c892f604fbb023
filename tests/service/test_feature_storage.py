"""PoolSettings.feature_storage FLOAT16: half-size feature arrays, the same loop as float32 (issue 20).

A FLOAT16 pool stores its three feature arrays as float16 (`<kind>.f16`, 2 bytes a value)
and keeps them float16 in memory; every computation upcasts them (distances in float64,
the heads in float32). Its results are those of the float32 pool of the same items up to
float16's rounding (relative 2^-11 per value).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from balpm import Client
from balpm.v1 import balpm_pb2 as pb
from balpm_server.domain.common import DEFAULT_TENANT
from balpm_server.domain.models import FeatureStorage, PoolSettings
from balpm_server.storage.sql_store import settings_from_json, settings_to_json
from tests.conftest import ServerThread, make_settings, synthetic_items
from tests.waiting import wait_until

DIM = 24
SMALL = {"ensemble_size": 3, "hidden_sizes": [32], "epochs": 40}
KINDS = ("prompt", "a", "b")


def _runtime(srv: ServerThread, pool_id: str) -> Any:
    svc = srv.running.service
    info = srv.call(svc._pools.require(DEFAULT_TENANT, pool_id))
    return info, svc._cache.runtime(info.key)


def _feature_files(srv: ServerThread, pool_id: str) -> dict[str, int]:
    info, _ = _runtime(srv, pool_id)
    folder = srv.settings.data_path / "pools" / info.key / "features"
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())}


def _label(c: Client, pool: str, item_ids: Sequence[str], truth: dict[str, str], tag: str) -> None:
    c.ingest_labels(
        pool,
        [{"label_id": f"{tag}-{iid}", "item_id": iid, "preference": truth[iid], "annotator_id": "ann"}
         for iid in item_ids],
    )


def _ids(batch: pb.AcquireBatchResponse) -> list[str]:
    return [a.item.item_id for a in batch.items]


def test_a_float16_pool_runs_the_whole_loop_like_its_float32_twin(server: ServerThread, client: Client) -> None:
    everything, truth = synthetic_items(400, DIM, seed=5)
    items, heldout = everything[:300], everything[300:]
    for it in heldout:
        it["split"] = "HELDOUT"
        it["heldout_preference"] = truth[it["item_id"]]
    p32 = client.create_pool("p32", feature_source="CLIENT", feature_dim=DIM, **SMALL)
    p16 = client.create_pool("p16", feature_source="CLIENT", feature_dim=DIM, feature_storage="FLOAT16", **SMALL)
    assert p32.settings.feature_storage == pb.FEATURE_STORAGE_FLOAT32  # the default, filled in
    assert p16.settings.feature_storage == pb.FEATURE_STORAGE_FLOAT16
    for pool in ("p32", "p16"):
        up = client.upload_items(pool, items + heldout, chunk_size=64)
        assert (up.accepted_count, len(up.rejections)) == (400, 0), up.rejections

    # Files: float16 ones, exactly half the bytes (N x D x 3 x 2 against x 4).
    f32, f16 = _feature_files(server, "p32"), _feature_files(server, "p16")
    assert f32 == {f"{k}.f32": 400 * DIM * 4 for k in ("a", "b", "prompt")}
    assert f16 == {f"{k}.f16": 400 * DIM * 2 for k in ("a", "b", "prompt")}

    # Cold start: BAL-PM picks by the entropy term alone, on the kNN radii of the float16 values.
    cold = {p: client.acquire(p, batch_size=40, strategy="BALPM", seed=3, annotator_id="ann") for p in ("p32", "p16")}
    _, rt16 = _runtime(server, "p16")
    _, rt32 = _runtime(server, "p32")
    assert rt16.prompt_N_D.dtype == rt16.a_N_D.dtype == rt16.b_N_D.dtype == np.float16  # the memory saving
    assert rt32.prompt_N_D.dtype == rt32.a_N_D.dtype == rt32.b_N_D.dtype == np.float32
    assert rt16.a_N_D.nbytes * 2 == rt32.a_N_D.nbytes
    # Radii move by float16's rounding only, so the same seed picks the same 40 items; measured:
    # identical but for one adjacent swap of two items whose entropy terms differ by 3e-5
    # (3.08387 vs 3.08384), and entropy terms within 1.7e-4 of the float32 pool's.
    assert set(_ids(cold["p16"])) == set(_ids(cold["p32"]))
    assert [a.control for a in cold["p16"].items] == [a.control for a in cold["p32"].items]
    ctl16 = [a.item.item_id for a in cold["p16"].items if a.control]
    assert ctl16 == [a.item.item_id for a in cold["p32"].items if a.control]  # the same seeded draw
    r16 = {a.item.item_id: a.scores.entropy for a in cold["p16"].items if not a.control}
    r32 = {a.item.item_id: a.scores.entropy for a in cold["p32"].items if not a.control}
    assert max(abs(r16[i] - r32[i]) for i in r32) < 1e-3
    _label(client, "p32", _ids(cold["p32"]), truth, "r0")
    _label(client, "p16", _ids(cold["p32"]), truth, "r0")  # the same labels in both pools

    for p in ("p32", "p16"):
        op = client.update_posterior(p, seed=7)
        assert op.state == pb.Operation.STATE_SUCCEEDED and op.result.posterior_version == 1

    # Predict (stored items) and Evaluate (held-out split): the same posterior up to rounding.
    probe = [it["item_id"] for it in items[:50]]
    pr32, pr16 = (client.predict(p, item_ids=probe).predictions for p in ("p32", "p16"))
    mean32 = np.array([p.prob_a for p in pr32])
    mean16 = np.array([p.prob_a for p in pr16])
    assert np.abs(mean16 - mean32).max() < 2e-3, np.abs(mean16 - mean32).max()  # measured 1.2e-4
    ev32, ev16 = client.evaluate("p32"), client.evaluate("p16")
    assert ev32.count == ev16.count == 100
    assert abs(ev16.log_likelihood - ev32.log_likelihood) < 1e-3  # measured 5e-6
    assert abs(ev16.accuracy - ev32.accuracy) <= 0.02  # measured equal (0.62)

    # Ad-hoc items with client features (not stored: float32 as sent) work in a float16 pool.
    adhoc = [{**it, "item_id": f"x-{i}"} for i, it in enumerate(items[:3])]
    assert len(client.predict("p16", items=adhoc).predictions) == 3

    # Warm rounds: BALD and BAL-PM rank by slightly different BALD scores; RANDOM is the same draw.
    warm: dict[str, dict[str, list[str]]] = {"p32": {}, "p16": {}}
    for p in ("p32", "p16"):
        for strategy, seed in (("BALPM", 4), ("BALD", 5), ("RANDOM", 6)):
            batch = client.acquire(p, batch_size=30, strategy=strategy, seed=seed, annotator_id="ann")
            warm[p][strategy] = _ids(batch)
            client.release_items(p, _ids(batch), annotator_id="ann")  # each strategy sees the same pool
    assert warm["p16"]["RANDOM"] == warm["p32"]["RANDOM"]
    for strategy in ("BALPM", "BALD"):
        overlap = len(set(warm["p16"][strategy]) & set(warm["p32"][strategy]))
        assert overlap >= 29, (strategy, overlap)  # measured: the same 30 in the same order for both

    # ExportItems with features: float32 values on the wire, the float16 rounding of what was sent.
    exported = {it.item_id: it for it in client.export_items("p16", include_features=True)}
    exported32 = {it.item_id: it for it in client.export_items("p32", include_features=True)}
    assert len(exported) == 400
    for it in everything[:20] + everything[-5:]:
        got, got32 = exported[it["item_id"]], exported32[it["item_id"]]
        for field in ("prompt_features", "completion_a_features", "completion_b_features"):
            sent = np.asarray(it[field])
            np.testing.assert_array_equal(np.asarray(getattr(got, field), np.float32),
                                          sent.astype(np.float16).astype(np.float32))
            np.testing.assert_array_equal(np.asarray(getattr(got32, field), np.float32), sent.astype(np.float32))
            np.testing.assert_allclose(np.asarray(getattr(got, field)), sent, rtol=2.0**-11, atol=1e-7)


def test_a_float16_pool_rejects_client_features_beyond_its_range(server: ServerThread, client: Client) -> None:
    client.create_pool("p16", feature_source="CLIENT", feature_dim=3, feature_storage="FLOAT16", **SMALL)
    client.create_pool("p32", feature_source="CLIENT", feature_dim=3, **SMALL)
    ok = {"prompt": "p", "completion_a": "a", "completion_b": "b", "prompt_features": [1.0, 2.0, 3.0],
          "completion_a_features": [0.5, -65504.0, 65504.0], "completion_b_features": [0.0, 0.0, 1.0]}
    items = [
        {**ok, "item_id": "fine"},  # 65504 is float16's largest finite value: stored
        {**ok, "item_id": "too-big", "completion_b_features": [0.0, 65520.0, 1.0]},  # would round to inf
        {**ok, "item_id": "too-small", "prompt_features": [-1e5, 0.0, 0.0]},
    ]
    up = client.upload_items("p16", items)
    assert up.accepted_count == 1
    got = {r.id: r for r in up.rejections}
    assert set(got) == {"too-big", "too-small"}
    assert (got["too-big"].reason, got["too-big"].field) == ("FEATURE_OUT_OF_RANGE", "items[1].completion_b_features")
    assert (got["too-small"].reason, got["too-small"].field) == ("FEATURE_OUT_OF_RANGE", "items[2].prompt_features")
    assert "65504" in got["too-big"].message and "FLOAT16" in got["too-big"].message
    stored = next(iter(client.export_items("p16", include_features=True)))
    assert list(stored.completion_a_features) == [0.5, -65504.0, 65504.0]
    # A float32 pool keeps its bound of 1e6.
    up32 = client.upload_items("p32", items)
    assert (up32.accepted_count, len(up32.rejections)) == (3, 0)


def test_a_float16_server_feature_pool_pauses_on_an_extractor_value_out_of_range(tmp_path: Path) -> None:
    srv = ServerThread(make_settings(tmp_path / "data", extract_batch_size=4))
    extractor = srv.running.service.extractor
    assert extractor is not None
    real_dim, real_embed = extractor.dim, extractor.embed
    huge = {"on": True}

    async def dim() -> int:
        return 8

    async def embed(texts: list[str]) -> np.ndarray:
        out = np.tile(np.linspace(-1, 1, 8, dtype=np.float32), (len(texts), 1))
        out += np.arange(len(texts), dtype=np.float32)[:, None] * 0.01
        if huge["on"] and any("boom" in t for t in texts):
            out[-1, 3] = 7e4  # beyond float16: would silently become inf
        return out

    extractor.dim, extractor.embed = dim, embed  # type: ignore[method-assign]
    try:
        with Client(srv.target, timeout_s=60) as c:
            c.create_pool("s16", feature_storage="FLOAT16", ensemble_size=2)
            rows = [{"item_id": f"t{i}", "prompt": f"prompt {i}", "completion_a": "yes",
                     "completion_b": "boom" if i == 6 else "no"} for i in range(8)]
            c.upload_items("s16", rows)
            paused = wait_until(
                lambda: (p := c.get_pool("s16")).HasField("featurization_pause") and p, 60, "the pause"
            )
            assert paused.featurization_pause.reason == "FEATURE_OUT_OF_RANGE"
            assert "70000" in paused.featurization_pause.message and "FLOAT16" in paused.featurization_pause.message
            assert paused.featurized_count == 4  # the first group is stored; the failing group is not
            assert paused.state == pb.Pool.STATE_FEATURIZING
            huge["on"] = False  # the extractor recovers: the group is retried and stored
            ready = wait_until(lambda: (p := c.get_pool("s16")).state == pb.Pool.STATE_READY and p, 60, "READY")
            assert ready.featurized_count == 8 and not ready.HasField("featurization_pause")
            assert _feature_files(srv, "s16") == {f"{k}.f16": 8 * 8 * 2 for k in ("a", "b", "prompt")}
            feats = [list(it.prompt_features) for it in c.export_items("s16", include_features=True)]
            assert len(feats) == 8 and all(np.isfinite(f).all() for f in feats)
    finally:
        extractor.dim, extractor.embed = real_dim, real_embed  # type: ignore[method-assign]
        srv.stop()


def test_default_pools_keep_float32_files_and_arrays(server: ServerThread, client: Client) -> None:
    items, _ = synthetic_items(30, 4, seed=2)
    pool = client.create_pool("plain", feature_source="CLIENT", feature_dim=4, **SMALL)
    assert pool.settings.feature_storage == pb.FEATURE_STORAGE_FLOAT32
    client.upload_items("plain", items)
    client.acquire("plain", batch_size=5, strategy="BALPM", seed=0)
    assert _feature_files(server, "plain") == {f"{k}.f32": 30 * 4 * 4 for k in ("a", "b", "prompt")}
    _, rt = _runtime(server, "plain")
    assert rt.prompt_N_D.dtype == np.float32
    exported = next(iter(client.export_items("plain", include_features=True)))
    assert list(exported.prompt_features) == np.float32(items[0]["prompt_features"]).tolist()


def test_feature_storage_persists_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    items, truth = synthetic_items(60, 6, seed=3)
    srv = ServerThread(make_settings(data, extractor=""))
    try:
        with Client(srv.target, timeout_s=60) as c:
            c.create_pool("p16", feature_source="CLIENT", feature_dim=6, feature_storage="FLOAT16", **SMALL)
            c.upload_items("p16", items)
            c.ingest_labels("p16", [{"label_id": f"l{i}", "item_id": it["item_id"],
                                     "preference": truth[it["item_id"]]} for i, it in enumerate(items[:30])])
            c.update_posterior("p16", seed=1)
            before = [p.prob_a for p in c.predict("p16", item_ids=["it-40", "it-41"]).predictions]
    finally:
        srv.stop()
    srv = ServerThread(make_settings(data, extractor=""))
    try:
        with Client(srv.target, timeout_s=60) as c:
            pool = c.get_pool("p16")
            assert pool.settings.feature_storage == pb.FEATURE_STORAGE_FLOAT16
            assert pool.item_count == 60
            after = [p.prob_a for p in c.predict("p16", item_ids=["it-40", "it-41"]).predictions]
            assert after == before  # the same float16 rows, read back from the .f16 files
            assert len(c.acquire("p16", batch_size=5, strategy="BALPM", seed=0).items) == 5
        _, rt = _runtime(srv, "p16")
        assert rt.prompt_N_D.dtype == np.float16
        assert set(_feature_files(srv, "p16")) == {"a.f16", "b.f16", "prompt.f16"}
    finally:
        srv.stop()


def test_settings_stored_without_the_key_read_as_float32(tmp_path: Path) -> None:
    body = json.loads(settings_to_json(PoolSettings(feature_storage=FeatureStorage.FLOAT16)))
    assert body["feature_storage"] == "FLOAT16"
    assert settings_from_json(json.dumps(body)).feature_storage is FeatureStorage.FLOAT16
    del body["feature_storage"]  # what a server from before the option stored
    assert settings_from_json(json.dumps(body)).feature_storage is FeatureStorage.FLOAT32

    # A pool whose stored settings lack the key (created before the option) opens as float32.
    data = tmp_path / "data"
    items, _ = synthetic_items(20, 4, seed=4)
    srv = ServerThread(make_settings(data, extractor=""))
    try:
        with Client(srv.target, timeout_s=60) as c:
            c.create_pool("old", feature_source="CLIENT", feature_dim=4, **SMALL)
            c.upload_items("old", items)
    finally:
        srv.stop()
    conn = sqlite3.connect(data / "balpm.sqlite3", isolation_level=None)
    (raw,) = conn.execute("SELECT settings_json FROM pools WHERE name = 'old'").fetchone()
    old = json.loads(raw)
    del old["feature_storage"]
    conn.execute("UPDATE pools SET settings_json = ? WHERE name = 'old'", (json.dumps(old),))
    conn.close()
    srv = ServerThread(make_settings(data, extractor=""))
    try:
        with Client(srv.target, timeout_s=60) as c:
            assert c.get_pool("old").settings.feature_storage == pb.FEATURE_STORAGE_FLOAT32
            assert len(c.acquire("old", batch_size=4, strategy="RANDOM").items) == 4
            exported = next(iter(c.export_items("old", include_features=True)))
            assert list(exported.prompt_features) == np.float32(items[0]["prompt_features"]).tolist()
    finally:
        srv.stop()


def test_unknown_feature_storage_is_rejected(client: Client) -> None:
    from balpm.errors import BalpmError, InvalidInputError

    with pytest.raises(InvalidInputError, match="FLOAT16"):
        client.create_pool("x", feature_source="CLIENT", feature_dim=3, feature_storage="FLOAT8")
    with pytest.raises(BalpmError) as e:
        client.create_pool("x", feature_source="CLIENT", feature_dim=3, feature_storage=7)
    assert (e.value.reason, e.value.field) == ("UNKNOWN_ENUM", "settings.feature_storage")


def test_the_artifact_chunks_of_a_float16_pool_restore_its_files(tmp_path: Path) -> None:
    """With an artifact store, a replica that lost its data dir rebuilds the .f16 files from float16 chunks."""
    import shutil

    items, _ = synthetic_items(40, 5, seed=6)
    art = tmp_path / "artifacts"
    art.mkdir()
    settings = make_settings(tmp_path / "data", extractor="", artifact_url=f"file://{art}")
    srv = ServerThread(settings)
    try:
        with Client(srv.target, timeout_s=60) as c:
            c.create_pool("p16", feature_source="CLIENT", feature_dim=5, feature_storage="FLOAT16", **SMALL)
            c.upload_items("p16", items, chunk_size=16)
            want = {it.item_id: list(it.prompt_features) for it in c.export_items("p16", include_features=True)}
        info, _ = _runtime(srv, "p16")
        folder = settings.data_path / "pools" / info.key / "features"
        chunks = sorted(art.rglob("features/*.npz"))  # not the kNN graph the background prebuild may store
        assert len(chunks) == 3  # 16 + 16 + 8 rows
        with np.load(chunks[0]) as z:
            assert z["prompt"].dtype == np.float16 and z["rows_R"].dtype == np.int64
    finally:
        srv.stop()
    shutil.rmtree(folder)
    srv = ServerThread(settings)
    try:
        with Client(srv.target, timeout_s=60) as c:
            assert len(c.acquire("p16", batch_size=4, strategy="RANDOM").items) == 4  # loads: restores the files
            got = {it.item_id: list(it.prompt_features) for it in c.export_items("p16", include_features=True)}
        assert got == want
        assert _feature_files(srv, "p16") == {f"{k}.f16": 40 * 5 * 2 for k in ("a", "b", "prompt")}
    finally:
        srv.stop()
