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
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from balpm_server.server import RunningServer, create_server
from balpm_server.settings import Settings

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


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: loopback, free port, no metrics port, client extractor unless asked."""
    base = Settings.from_env(
        environ={}, host="127.0.0.1", port=0, data_dir=str(data_dir), metrics_port=-1, log_json=False
    )
    return dataclasses.replace(base, **overrides)


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
