"""Triton going away in the middle of an extraction: typed errors, bounded retries, resumption."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from triton_harness import TritonFixture

from balpm_server import errors
from balpm_server.features.transformers_extractor import TransformersExtractor
from balpm_server.features.triton_extractor import TritonExtractor
from tests.waiting import run_within

pytestmark = [pytest.mark.triton, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def running_triton(triton_server: TritonFixture) -> Iterator[TritonFixture]:
    """`triton_server`, (re)started if an earlier test left it stopped."""
    triton_server.server.start(ready_timeout_s=180.0)
    yield triton_server


def distinct_texts(n: int) -> list[str]:
    """n texts whose in-vocabulary words differ (the tiny tokenizer maps unknown words to UNK)."""
    words = ["the", "good", "bad", "answer", "question", "model", "human", "prefer", "yes", "no", "because", "helpful"]
    out = []
    for i in range(n):
        digits, k = [], i
        for _ in range(4):
            digits.append(words[k % len(words)])
            k //= len(words)
        out.append(" ".join(digits))
    assert len(set(out)) == n
    return out


def count_chunks(ex: TritonExtractor, on_chunk: Callable[[int], None]) -> None:
    """Call `on_chunk(n_done)` after every successful request of `ex`."""
    original = ex._infer_chunk
    n_done = 0

    async def counting(texts: list[str]) -> np.ndarray:
        nonlocal n_done
        out = await original(texts)
        n_done += 1
        on_chunk(n_done)
        return out

    ex._infer_chunk = counting  # type: ignore[method-assign]


def test_graceful_stop_and_restart_within_retry_window_resumes(
    running_triton: TritonFixture,
) -> None:
    texts = distinct_texts(1500)
    ex = TritonExtractor(
        running_triton.grpc_url,
        running_triton.model_name,
        batch_size=4,
        max_in_flight=3,
        timeout_s=10.0,
        max_attempts=1000,
        retry_budget_s=150.0,
        backoff_initial_s=0.2,
        backoff_max_s=1.0,
    )
    restarted = threading.Event()
    restart_errors: list[BaseException] = []

    def restart() -> None:
        try:
            running_triton.server.restart(ready_timeout_s=120.0)  # SIGTERM, then start again
        except BaseException as e:
            restart_errors.append(e)
        finally:
            restarted.set()

    started = threading.Event()

    def restart_after(n_done: int) -> None:
        if n_done == 20 and not started.is_set():
            started.set()
            threading.Thread(target=restart, daemon=True).start()

    count_chunks(ex, restart_after)

    async def run() -> np.ndarray:
        try:
            return await ex.embed(texts)
        finally:
            await ex.close()

    got_N_D = asyncio.run(run())
    assert started.is_set()
    assert restarted.wait(150.0) and not restart_errors, restart_errors
    assert running_triton.server.is_running()
    # Every row is the features of its own text: nothing lost, duplicated or reordered.
    expected_N_D = TransformersExtractor(
        str(running_triton.model_path),
        pooling="mean",
        max_length_tokens=running_triton.max_length_tokens,
        device="cpu",
    ).embed_sync(texts)
    assert got_N_D.shape == expected_N_D.shape
    assert float(np.abs(got_N_D - expected_N_D).max()) <= 1e-4
    assert len({row.tobytes() for row in got_N_D}) == len(texts)


def test_crash_mid_extraction_raises_unavailable_after_bounded_retries(
    running_triton: TritonFixture,
) -> None:
    texts = distinct_texts(4000)
    ex = TritonExtractor(
        running_triton.grpc_url,
        running_triton.model_name,
        batch_size=4,
        max_in_flight=2,
        timeout_s=5.0,
        max_attempts=4,
        retry_budget_s=3.0,
        backoff_initial_s=0.2,
    )
    killed = threading.Event()

    def kill_after(n_done: int) -> None:
        if n_done == 20 and not killed.is_set():
            killed.set()
            running_triton.server.kill()  # SIGKILL: a crash, connections drop

    count_chunks(ex, kill_after)

    async def run() -> None:
        try:
            await ex.embed(texts)
        finally:
            await ex.close()

    with pytest.raises(errors.Unavailable) as info:
        run_within(run(), 15.0, "the extraction to give up after bounded retries")
    assert killed.is_set(), "the extraction finished before the server was killed"
    assert info.value.reason == "TRITON_UNAVAILABLE"
