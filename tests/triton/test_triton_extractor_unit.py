"""`TritonExtractor` behaviour that needs no running Triton: validation, error mapping, retries."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from triton_harness import free_port
from tritonclient.utils import InferenceServerException

from balpm_server import errors
from balpm_server.features import triton_extractor
from balpm_server.features.base import build_extractor
from balpm_server.features.triton_extractor import TritonExtractor
from balpm_server.settings import Settings
from tests.waiting import run_within

pytestmark = pytest.mark.slow  # the Triton tests are one tier (tests/conftest.py)

GOOD_METADATA: dict[str, Any] = {
    "name": "balpm_extractor",
    "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": ["-1", "1"]}],
    "outputs": [
        {"name": "LAST_TOKEN", "datatype": "FP32", "shape": ["-1", "-1"]},
        {"name": "MEAN_EMBEDDING", "datatype": "FP32", "shape": ["-1", "384"]},
    ],
}


def test_build_extractor_makes_triton_extractor() -> None:
    settings = Settings.from_env(environ={}, extractor="triton", triton_url="127.0.0.1:1", triton_output="LAST_TOKEN")
    ex = build_extractor(settings)
    assert isinstance(ex, TritonExtractor)
    assert ex.name == "triton:LAST_TOKEN:balpm_extractor"


@pytest.mark.parametrize(
    "kwargs",
    [{"output_name": "POOLED"}, {"timeout_s": 0}, {"max_in_flight": 0}, {"batch_size": 0}],
)
def test_bad_arguments_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TritonExtractor("127.0.0.1:1", "m", **kwargs)


def test_metadata_dim_and_validation() -> None:
    ex = TritonExtractor("127.0.0.1:1", "balpm_extractor")
    assert ex._dim_from_metadata(GOOD_METADATA) == 384
    last = TritonExtractor("127.0.0.1:1", "balpm_extractor", output_name="LAST_TOKEN")
    assert last._dim_from_metadata(GOOD_METADATA) == -1  # variable: dim() probes
    bad_type = {**GOOD_METADATA, "inputs": [{"name": "TEXT", "datatype": "INT64"}]}
    no_output = {**GOOD_METADATA, "outputs": GOOD_METADATA["outputs"][:1]}
    unbatched = {
        **GOOD_METADATA,
        "outputs": [{"name": "MEAN_EMBEDDING", "datatype": "FP32", "shape": ["384"]}],
    }
    for meta in (bad_type, no_output, unbatched):
        with pytest.raises(errors.FailedPrecondition) as info:
            ex._dim_from_metadata(meta)
        assert info.value.reason == "TRITON_BAD_METADATA"


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", errors.Unavailable),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", errors.Unavailable),
        ("StatusCode.INTERNAL", "forward pass failed", errors.Unavailable),
        ("StatusCode.RESOURCE_EXHAUSTED", "too big", errors.Unavailable),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'm' is not found", errors.FailedPrecondition),
        (
            "StatusCode.UNAVAILABLE",
            "Request for unknown model: 'm' has no available versions",
            errors.FailedPrecondition,
        ),
        ("StatusCode.INVALID_ARGUMENT", "unexpected inference input 'X'", errors.FailedPrecondition),
        (None, "boom", errors.Unavailable),
    ],
)
def test_every_error_is_typed(status: str | None, message: str, expected: type) -> None:
    ex = TritonExtractor("127.0.0.1:1", "m")
    typed = ex._typed(InferenceServerException(msg=message, status=status), "infer")
    assert type(typed) is expected
    assert isinstance(ex._typed(RuntimeError("x"), "infer"), errors.Unavailable)


def test_retries_are_bounded_then_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    ex = TritonExtractor("127.0.0.1:1", "m", max_attempts=4, backoff_initial_s=0.01, retry_budget_s=30.0)
    calls: list[float] = []

    async def always_unavailable() -> np.ndarray:
        calls.append(time.monotonic())
        raise InferenceServerException(msg="connection refused", status="StatusCode.UNAVAILABLE")

    with pytest.raises(errors.Unavailable) as info:
        asyncio.run(ex._with_retries("infer", always_unavailable))
    assert len(calls) == 4
    assert info.value.metadata["attempts"] == "4"
    assert not isinstance(info.value.__cause__, errors.BalpmError)

    # The budget on a fake clock that only the attempts advance (0.1 s each): the 5th attempt
    # ends at 0.5 s, and 0.5 s + the 0.01 s backoff is over the 0.5 s budget, so it stops there.
    clock = SimpleNamespace(now_s=1000.0)

    async def slow_unavailable() -> np.ndarray:
        clock.now_s += 0.1
        return await always_unavailable()

    monkeypatch.setattr(triton_extractor, "time", SimpleNamespace(monotonic=lambda: clock.now_s))
    budget = TritonExtractor(
        "127.0.0.1:1", "m", max_attempts=1000, backoff_initial_s=0.01, backoff_max_s=0.01, retry_budget_s=0.5
    )
    calls.clear()
    with pytest.raises(errors.Unavailable) as info:
        asyncio.run(budget._with_retries("infer", slow_unavailable))
    assert len(calls) == 5
    assert info.value.metadata["attempts"] == "5"


def test_deployment_errors_are_not_retried() -> None:
    ex = TritonExtractor("127.0.0.1:1", "m", backoff_initial_s=0.01)
    calls = 0

    async def bad_input() -> None:
        nonlocal calls
        calls += 1
        raise InferenceServerException(msg="unexpected input", status="StatusCode.INVALID_ARGUMENT")

    with pytest.raises(errors.FailedPrecondition):
        asyncio.run(ex._with_retries("infer", bad_input, retry_missing_model=True))
    assert calls == 1


def test_unreachable_url_is_unavailable_quickly() -> None:
    url = f"127.0.0.1:{free_port()}"  # nothing listens there

    async def run() -> None:
        ex = TritonExtractor(url, "balpm_extractor", timeout_s=5.0)
        try:
            with pytest.raises(errors.Unavailable) as info:
                await ex.embed(["x"])
            assert info.value.reason == "TRITON_UNAVAILABLE"
            assert int(info.value.metadata["attempts"]) > 1  # it did retry, boundedly
            with pytest.raises(errors.Unavailable):
                await ex.dim()
        finally:
            await ex.close()

    run_within(run(), 15.0, "an unreachable URL to give up (bounded retries)")
