"""PostgreSQL + S3 as the system of record: a lost data dir, a database outage, --check-storage, migrations.

Real components only: a PostgreSQL server and `moto_server` on loopback (tests/backends.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from balpm import Client
from balpm.errors import BalpmError
from tests.backends import PostgresServer
from tests.conftest import ServerThread, backend_overrides, make_settings, synthetic_items

SMALL = {"ensemble_size": 2, "hidden_sizes": [16], "epochs": 10}


def _s3_keys(s3: Any, url: str) -> list[str]:
    import boto3

    bucket, prefix = url[len("s3://") :].split("/", 1)
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return sorted(obj["Key"][len(prefix) + 1 :] for page in pages for obj in page.get("Contents", []))


def test_a_replica_with_an_empty_data_dir_serves_every_pool_from_database_and_bucket(
    tmp_path: Path, request: pytest.FixtureRequest, s3_server: Any
) -> None:
    shared = backend_overrides(request, "postgres")
    items, truth = synthetic_items(120, 8, seed=3)
    first = ServerThread(make_settings(tmp_path / "replica-a", extractor="", **shared))
    try:
        with Client(first.target, timeout_s=60) as c:
            c.create_pool("p", feature_source="CLIENT", feature_dim=8, **SMALL)
            c.upload_items("p", items)
            c.ingest_labels("p", [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]}
                                  for i in range(30)])
            op = c.update_posterior("p", seed=0)
            assert op.result.posterior_version == 1
            c.acquire("p", batch_size=4, strategy="BALPM", seed=1, annotator_id="ann")  # builds the kNN graph
            before = c.predict("p", item_ids=[f"it-{i}" for i in range(40, 50)])
    finally:
        first.stop()
    keys = _s3_keys(s3_server, shared["artifact_url"])
    assert any("/features/" in k for k in keys), keys
    assert any("/posterior/v000001/model.safetensors" in k for k in keys), keys
    assert any("/knn/" in k for k in keys), keys

    # Another replica: same database and bucket, nothing on its disk.
    second = ServerThread(make_settings(tmp_path / "replica-b", extractor="", **shared))
    try:
        with Client(second.target, timeout_s=60) as c:
            pool = c.get_pool("p")
            assert (pool.item_count, pool.label_count, pool.posterior_version) == (120, 30, 1)
            after = c.predict("p", item_ids=[f"it-{i}" for i in range(40, 50)])
            np.testing.assert_allclose(
                [p.prob_a for p in after.predictions], [p.prob_a for p in before.predictions]
            )
            batch = c.acquire("p", batch_size=4, strategy="BALPM", seed=1, annotator_id="ann2")
            assert len(batch.items) == 4
            op = c.update_posterior("p", seed=0)
            assert op.result.posterior_version == 2  # numbered after the published version, not from 1 again
    finally:
        second.stop()


def test_database_outage_fails_unavailable_loses_nothing_and_the_server_reconnects(
    tmp_path: Path, s3_server: Any
) -> None:
    pg = PostgresServer(tmp_path / "own-pg")  # its own server: this test stops it
    try:
        url = pg.new_database()
        srv = ServerThread(make_settings(tmp_path / "data", extractor="", database_url=url,
                                         database_connect_timeout_s=2.0))
        try:
            items, truth = synthetic_items(40, 8, seed=5)
            acked: set[str] = set()
            with Client(srv.target, timeout_s=30, retry=False) as c:
                c.create_pool("p", feature_source="CLIENT", feature_dim=8, **SMALL)
                c.upload_items("p", items)
                c.ingest_labels("p", [{"label_id": "l0", "item_id": "it-0", "preference": truth["it-0"]}])
                acked.add("l0")
                pg.stop("immediate")  # the database goes away mid-session (connections die)
                started = time.monotonic()
                with pytest.raises(BalpmError) as info:
                    c.ingest_labels("p", [{"label_id": "l1", "item_id": "it-1", "preference": truth["it-1"]}])
                assert info.value.code.name == "UNAVAILABLE" and info.value.reason == "DATABASE_UNAVAILABLE"
                assert time.monotonic() - started < 20
                pg.start()
                deadline = time.monotonic() + 30
                while True:  # the server reconnects by itself; the client retries the same label ids
                    try:
                        again = [{"label_id": f"l{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]}
                                 for i in (1, 2)]
                        c.ingest_labels("p", again)
                        acked |= {"l1", "l2"}
                        break
                    except BalpmError as e:
                        assert e.code.name == "UNAVAILABLE", e
                        assert time.monotonic() < deadline, "the server did not reconnect"
                        time.sleep(0.5)
                stored = {lb.label.label_id for lb in c.export_labels("p")}
                assert stored == acked
                assert c.get_pool("p").label_count == 3
        finally:
            srv.stop()
    finally:
        pg.close()


def _check(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "balpm_server.server", "--check-storage", "--data-dir", str(tmp_path / "d"),
         "--log-level", "ERROR", "--database-connect-timeout-s", "1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )


def test_check_storage_says_what_works_and_what_does_not(
    tmp_path: Path, request: pytest.FixtureRequest, s3_server: Any
) -> None:
    good = {"BALPM_" + k.upper(): v for k, v in backend_overrides(request, "postgres").items()}
    ok = _check(good, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "database ok: postgresql://postgres@127.0.0.1:" in ok.stdout and "artifact store ok: s3://" in ok.stdout

    down = _check({**good, "BALPM_DATABASE_URL": "postgresql://postgres:secret@127.0.0.1:1/none"}, tmp_path)
    assert down.returncode == 2
    assert "error: database postgresql://postgres@127.0.0.1:1/none" in down.stderr
    assert "DATABASE_UNAVAILABLE" in down.stderr
    assert "secret" not in down.stderr + down.stdout

    no_bucket = _check({**good, "BALPM_ARTIFACT_URL": "s3://no-such-bucket/x"}, tmp_path)
    assert no_bucket.returncode == 2 and "error: artifact store: s3://no-such-bucket/x" in no_bucket.stderr

    bad_url = _check({**good, "BALPM_DATABASE_URL": "mysql://x"}, tmp_path)
    assert bad_url.returncode == 2 and "BALPM_DATABASE_URL must be" in bad_url.stderr


def test_postgres_schema_migrates_from_empty_and_from_the_previous_version(pg_server: Any) -> None:
    import psycopg

    from balpm_server import errors
    from balpm_server.storage.postgres_store import MIGRATIONS, SCHEMA_VERSION, PostgresStore

    fresh = PostgresStore(pg_server.new_database())
    fresh.close()
    url = pg_server.new_database()
    with psycopg.connect(url, autocommit=True) as conn:  # a database left by the previous release
        conn.execute("CREATE TABLE balpm_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO balpm_schema VALUES (%s)", (SCHEMA_VERSION - 1,))
        for migration in MIGRATIONS[: SCHEMA_VERSION - 1]:
            for statement in migration.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute("INSERT INTO pools (pool_id, name, tenant, settings_json, state, extractor, create_time)"
                     " VALUES ('k', 'p', 't', '{}', 'READY', '', 0)")
    upgraded = PostgresStore(url)
    try:
        assert upgraded.pool_key("t", "p") == "k"  # the old rows are still there
        upgraded.publish_artifact("k", "features", "pools/k/features/x.npz")  # the tables of every version
        assert upgraded.artifacts_of("k", "features") == ["pools/k/features/x.npz"]
        owner = upgraded.assign_pool("k", "r0", 0.0, 5.0)  # the newest version's (cluster ownership)
        assert owner is not None and owner.epoch == 1
    finally:
        upgraded.close()
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM balpm_schema").fetchone() == (SCHEMA_VERSION,)
        conn.execute("UPDATE balpm_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(errors.FailedPrecondition, match="newer than this server"):
        PostgresStore(url)


def test_bucket_outage_fails_uploads_unavailable_and_stores_nothing(tmp_path: Path, pg_server: Any) -> None:
    from tests.backends import MotoServer

    moto = MotoServer(tmp_path / "moto.log")  # its own server: this test stops it
    env = moto.env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        srv = ServerThread(make_settings(tmp_path / "data", extractor="", database_url=pg_server.new_database(),
                                         artifact_url=f"s3://{moto.new_bucket()}/p"))
        try:
            items, _ = synthetic_items(30, 8, seed=9)
            with Client(srv.target, timeout_s=60, retry=False) as c:
                c.create_pool("p", feature_source="CLIENT", feature_dim=8, **SMALL)
                c.upload_items("p", items[:20])
                moto.close()  # the bucket goes away
                with pytest.raises(BalpmError) as info:
                    c.upload_items("p", items[20:])
                assert info.value.code.name == "UNAVAILABLE" and info.value.reason == "ARTIFACT_STORE_UNAVAILABLE"
                assert c.get_pool("p").item_count == 20  # nothing of the failed chunk was committed
                assert len(c.acquire("p", batch_size=4, strategy="RANDOM", seed=0).items) == 4  # still serving
        finally:
            srv.stop()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        moto.close()
