"""Shared fixtures: a real balpm server on a free loopback port, run in a background event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from balpm_server.server import RunningServer, create_server
from balpm_server.settings import Settings


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
