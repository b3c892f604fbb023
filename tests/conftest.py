"""Shared fixtures: a real balpm server on a free loopback port, run in a background event loop.

Also the test tiers (markers registered in pyproject.toml). Every test is in exactly one:

* `unit`: starts no server (no gRPC server, no `balpm-server` process); tests/unit by default;
* `service`: a real server on loopback; tests/service, tests/client, tests/interop by default;
* `slow`: the long ones, marked explicitly (`@pytest.mark.slow` / `pytestmark`): fuzz at full
  count, SIGKILL x20, the label-efficiency pipeline, Triton, Label Studio.

An explicit `slow` or `service` marker wins over the folder (e.g. the HEALTHCHECK tests in
tests/unit start a gRPC health server, so they are `service`). A test in no tier fails
collection, and a `unit` test that creates a gRPC server fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from balpm_server.server import RunningServer, create_server
from balpm_server.settings import Settings
from tests.backends import BACKEND_OVERRIDES

TIERS = ("unit", "service", "slow")
TIER_BY_FOLDER = {"unit": "unit", "service": "service", "client": "service", "interop": "service"}
TESTS_DIR = Path(__file__).resolve().parent


def _tier(item: pytest.Item) -> str | None:
    """The tier an item belongs to: an explicit tier marker first (slow over service), else its folder."""
    for tier in ("slow", "service", "unit"):
        if item.get_closest_marker(tier) is not None:
            return tier
    path = item.path.resolve()
    if not path.is_relative_to(TESTS_DIR):
        return None
    parts = path.relative_to(TESTS_DIR).parts
    return TIER_BY_FOLDER.get(parts[0]) if len(parts) > 1 else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put every test in exactly one tier (so `-m unit`, `-m service`, `-m slow` partition the suite)."""
    untiered = []
    for item in items:
        tier = _tier(item)
        if tier is None:
            untiered.append(item.nodeid)
            continue
        if item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))
    if untiered:
        raise pytest.UsageError(
            f"tests in no tier (put them under tests/unit, tests/service, ... or mark them slow): {untiered}"
        )


@pytest.fixture(autouse=True)
def _unit_tests_start_no_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the `unit` tier, creating a gRPC server is an error: such a test belongs in `service`."""
    if _tier(request.node) != "unit":
        return

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError(f"{request.node.nodeid} is in the unit tier but starts a gRPC server: mark it service")

    monkeypatch.setattr(grpc, "server", refuse)
    monkeypatch.setattr(grpc.aio, "server", refuse)


class ServerThread:
    """Runs `create_server` in its own event loop thread so tests can use the blocking SDK."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningServer = self.call(create_server(settings))
        self.target = f"127.0.0.1:{self.running.port}"

    def call(self, coro: Any, timeout_s: float = 120.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        """Stop the server and its loop."""
        self.call(self.running.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# ---- storage backends --------------------------------------------------------------------
#
# Tests marked `storage_matrix` run once per backend: "sqlite" (the embedded default: SQLite
# and the data dir) and "postgres" (a real PostgreSQL server for the records and a real
# S3-compatible server for the artifacts, both on loopback, started once per session). The
# autouse `backend` fixture points `make_settings` (and `procserver.ProcServer`) at a fresh
# database and bucket prefix per test; a restart inside one test reuses them.

BACKENDS = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise `storage_matrix` tests over every backend."""
    if metafunc.definition.get_closest_marker("storage_matrix") is not None:
        if "backend" not in metafunc.fixturenames:
            metafunc.fixturenames.append("backend")
        metafunc.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real PostgreSQL 16 server (the `pgserver` wheel's binaries) on 127.0.0.1."""
    from tests.backends import PostgresServer

    pg = PostgresServer(Path(tempfile.mkdtemp(prefix="balpm-pg-")) / "pg")
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3-compatible server (`moto_server`) on 127.0.0.1, with boto3's environment pointed at it."""
    from tests.backends import MotoServer

    moto = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    saved = {k: os.environ.get(k) for k in moto.env()}
    os.environ.update(moto.env())
    try:
        yield moto
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        moto.close()


def backend_overrides(request: pytest.FixtureRequest, name: str) -> dict[str, str]:
    """Settings fields that put a server on backend `name` (a fresh database and bucket for postgres)."""
    if name == "sqlite":
        return {}
    if name != "postgres":
        raise ValueError(f"unknown backend {name!r}")
    pg = request.getfixturevalue("pg_server")
    s3 = request.getfixturevalue("s3_server")
    return {"database_url": pg.new_database(), "artifact_url": f"s3://{s3.new_bucket()}/balpm"}


@pytest.fixture(autouse=True)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The storage backend of this test ("sqlite" unless the test is in the `storage_matrix`)."""
    name = getattr(request, "param", "sqlite")
    BACKEND_OVERRIDES.clear()
    BACKEND_OVERRIDES.update(backend_overrides(request, name))
    try:
        yield name
    finally:
        BACKEND_OVERRIDES.clear()


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: loopback, free port, no metrics port, client extractor unless asked.

    The current test's storage backend (`backend`) applies unless `overrides` name its fields.
    """
    base = Settings.from_env(
        environ={}, host="127.0.0.1", port=0, data_dir=str(data_dir), metrics_port=-1, log_json=False
    )
    return dataclasses.replace(base, **{**BACKEND_OVERRIDES, **overrides})


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    """A real server with the embedded extractor configured (loaded lazily)."""
    srv = ServerThread(make_settings(tmp_path / "data"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[Any]:
    """An SDK client connected to `server`."""
    from balpm import Client

    with Client(server.target, timeout_s=60) as c:
        yield c


def synthetic_items(
    n: int, dim: int, seed: int, *, n_prompts: int | None = None
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Client-feature items whose preference follows a hidden linear reward.

    Returns:
        (items, truth) where truth maps item_id -> "A" or "B".
    """
    rng = np.random.default_rng(seed)
    w_D = rng.normal(size=dim)
    n_prompts = n_prompts or n
    prompts_P_D = rng.normal(size=(n_prompts, dim))
    items, truth = [], {}
    for i in range(n):
        p = prompts_P_D[i % n_prompts]
        a = p + rng.normal(size=dim)
        b = p + rng.normal(size=dim)
        iid = f"it-{i}"
        items.append(
            {
                "item_id": iid,
                "prompt": f"prompt {i % n_prompts}",
                "completion_a": f"a {i}",
                "completion_b": f"b {i}",
                "prompt_features": p.tolist(),
                "completion_a_features": a.tolist(),
                "completion_b_features": b.tolist(),
            }
        )
        truth[iid] = "A" if float(w_D @ a) > float(w_D @ b) else "B"
    return items, truth
