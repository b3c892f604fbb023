"""Features served by a real tritonserver equal the in-process extractor; client error mapping."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from triton_harness import TritonFixture

from balpm_server import errors
from balpm_server.features.base import FeatureExtractor
from balpm_server.features.transformers_extractor import TransformersExtractor
from balpm_server.features.triton_extractor import TritonExtractor
from tests.waiting import run_within

pytestmark = [pytest.mark.triton, pytest.mark.slow, pytest.mark.timeout(300)]

POOLING_TO_OUTPUT = {"mean": "MEAN_EMBEDDING", "last_token": "LAST_TOKEN"}


def sample_texts(n: int, seed: int = 0) -> list[str]:
    """Distinct texts of varied length, incl. unknown words, unicode and over-long ones."""
    rng = np.random.default_rng(seed)
    words = [
        "the",
        "good",
        "bad",
        "answer",
        "question",
        "model",
        "human",
        "prefer",
        "yes",
        "no",
        "because",
        "helpful",
        "zzz",
        "é",
        "😀",
    ]
    out = []
    for i in range(n):
        length = int(rng.integers(1, 12)) if i % 10 else int(rng.integers(70, 120))
        out.append(f"text {i} " + " ".join(rng.choice(words, size=length)))
    return out


def in_process(fx: TritonFixture, pooling: str, texts: list[str]) -> np.ndarray:
    ref = TransformersExtractor(
        str(fx.model_path),
        pooling=pooling,
        max_length_tokens=fx.max_length_tokens,
        batch_size=16,
        device="cpu",
    )
    return ref.embed_sync(texts)


@pytest.mark.parametrize("pooling", ["mean", "last_token"])
def test_triton_features_equal_in_process(triton_server: TritonFixture, pooling: str) -> None:
    texts = [*sample_texts(90), "", "the", "the the the the the"]
    expected_N_D = in_process(triton_server, pooling, texts)

    async def run() -> np.ndarray:
        ex = TritonExtractor(
            triton_server.grpc_url,
            triton_server.model_name,
            output_name=POOLING_TO_OUTPUT[pooling],
            batch_size=8,
            max_in_flight=4,
        )
        try:
            assert isinstance(ex, FeatureExtractor)
            assert await ex.dim() == expected_N_D.shape[1]
            return await ex.embed(texts)
        finally:
            await ex.close()

    got_N_D = asyncio.run(run())
    assert got_N_D.dtype == np.float32
    assert got_N_D.shape == expected_N_D.shape
    assert np.isfinite(got_N_D).all()
    assert float(np.abs(got_N_D - expected_N_D).max()) <= 1e-4
    # The two poolings really differ (the test would be vacuous otherwise).
    assert not np.allclose(
        expected_N_D, in_process(triton_server, "mean" if pooling != "mean" else "last_token", texts)
    )


def test_order_kept_with_many_concurrent_requests(triton_server: TritonFixture) -> None:
    texts = sample_texts(301, seed=1)
    expected_N_D = in_process(triton_server, "mean", texts)

    async def run() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ex = TritonExtractor(triton_server.grpc_url, triton_server.model_name, batch_size=5, max_in_flight=8)
        try:
            # Two extractions at once on one extractor share the in-flight cap.
            a, b = await asyncio.gather(ex.embed(texts), ex.embed(texts[::-1]))
            empty = await ex.embed([])
            return a, b, empty
        finally:
            await ex.close()

    got_N_D, reversed_N_D, empty_0_D = asyncio.run(run())
    assert float(np.abs(got_N_D - expected_N_D).max()) <= 1e-4
    assert float(np.abs(reversed_N_D - expected_N_D[::-1]).max()) <= 1e-4
    assert empty_0_D.shape == (0, expected_N_D.shape[1])


def test_extractor_reusable_across_event_loops(triton_server: TritonFixture) -> None:
    ex = TritonExtractor(triton_server.grpc_url, triton_server.model_name)
    first = asyncio.run(ex.embed(["the good answer"]))
    second = asyncio.run(ex.embed(["the good answer"]))  # new loop -> new channel
    asyncio.run(ex.close())
    np.testing.assert_array_equal(first, second)
    assert ex.name == "triton:MEAN_EMBEDDING:balpm_extractor"


def test_missing_model_is_failed_precondition(triton_server: TritonFixture) -> None:
    async def run() -> None:
        ex = TritonExtractor(triton_server.grpc_url, "no_such_model")
        try:
            with pytest.raises(errors.FailedPrecondition) as info:
                await ex.dim()
            assert info.value.reason == "TRITON_MODEL_UNAVAILABLE"
            with pytest.raises(errors.FailedPrecondition):
                await ex.embed(["x"])
        finally:
            await ex.close()

    run_within(run(), 10.0, "a missing model to be reported (not retried)")


def test_missing_model_version_is_failed_precondition(triton_server: TritonFixture) -> None:
    async def run() -> None:
        ex = TritonExtractor(triton_server.grpc_url, triton_server.model_name, model_version="7")
        try:
            with pytest.raises(errors.FailedPrecondition):
                await ex.dim()
        finally:
            await ex.close()

    asyncio.run(run())
