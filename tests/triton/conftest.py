"""Fixtures for tests that need a real Triton Inference Server (marker `triton`).

`triton_server` (module scope) starts the `tritonserver` bundled in `nvidia-pytriton`
(from the separate venv made by `.ci/triton_venv.sh`) with a copy of the project's own
`deploy/triton/model_repository`, CPU config (`configs/cpu.pbtxt`), serving a tiny random
GPT-2 built in code (`tiny_model_path`, session scope). It yields a `TritonFixture`: the
gRPC URL, model name and model path are all a server-level e2e test needs, e.g.

    def test_pool_upload_through_triton(triton_server, tmp_path):
        settings = make_settings(tmp_path, extractor="triton",
                                 triton_url=triton_server.grpc_url,
                                 triton_model=triton_server.model_name,
                                 max_length_tokens=triton_server.max_length_tokens)

If the venv cannot be created (e.g. no network on a cold cache) the tests skip with the
reason, unless BALPM_TRITON_REQUIRED=1 (CI), which turns that into a failure.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from triton_harness import (
    MODEL_NAME,
    TritonFixture,
    TritonInstall,
    TritonServer,
    TritonUnavailableError,
    build_tiny_model,
    ensure_triton_venv,
    prepare_model_repository,
)

TINY_MAX_LENGTH_TOKENS = 64


def _unavailable(reason: str) -> None:
    if os.environ.get("BALPM_TRITON_REQUIRED", "") in ("1", "true", "yes"):
        pytest.fail(f"Triton is required (BALPM_TRITON_REQUIRED=1) but unavailable: {reason}")
    pytest.skip(f"Triton unavailable: {reason}")


@pytest.fixture(scope="session")
def triton_install() -> TritonInstall:
    """The tritonserver install in `.cache/triton-venv` (created on first use)."""
    try:
        return TritonInstall.find(ensure_triton_venv())
    except TritonUnavailableError as e:
        _unavailable(str(e))
        raise  # unreachable: _unavailable raises


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny GPT-2 + word-level tokenizer saved with save_pretrained."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), n_positions=128)


@pytest.fixture(scope="module")
def triton_server(triton_install: TritonInstall, tiny_model_path: Path) -> Iterator[TritonFixture]:
    """A tritonserver serving the project's model repository on free loopback ports."""
    work = Path(tempfile.mkdtemp(prefix="balpm-triton-"))
    repo = prepare_model_repository(
        work / "model_repository",
        model_path=tiny_model_path,
        max_length_tokens=TINY_MAX_LENGTH_TOKENS,
        torch_num_threads=1,
    )
    server = TritonServer(triton_install, repo, work, model_config_name="cpu")
    try:
        server.start(ready_timeout_s=180.0)
    except TritonUnavailableError as e:
        pytest.fail(f"tritonserver did not start: {e}")
    try:
        yield TritonFixture(
            server=server,
            grpc_url=server.grpc_url,
            http_url=server.http_url,
            model_name=MODEL_NAME,
            model_path=tiny_model_path,
            max_length_tokens=TINY_MAX_LENGTH_TOKENS,
        )
    finally:
        server.stop()
