"""Static checks of deploy/triton/model_repository (no server needed)."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path

import pytest
from triton_harness import MODEL_NAME, MODEL_REPOSITORY, prepare_model_repository

from balpm_server.features import transformers_extractor

pytestmark = pytest.mark.slow  # the Triton tests are one tier (tests/conftest.py)

MODEL_DIR = MODEL_REPOSITORY / MODEL_NAME


def _function_ast(source: str, name: str) -> str:
    """ast dump of function `name` without its docstring (code only)."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                node.body = body[1:]
            return ast.dump(node, include_attributes=False)
    raise AssertionError(f"{name} not found")


def test_model_py_pooling_is_the_in_process_pooling() -> None:
    served = _function_ast((MODEL_DIR / "1" / "model.py").read_text(), "pool_hidden")
    in_process = _function_ast(inspect.getsource(transformers_extractor.pool_hidden), "pool_hidden")
    # Only the error message may differ (model.py cannot import POOLINGS).
    strip = re.compile(r"Constant\(value='unknown pooling[^)]*\)|JoinedStr\(values=\[.*?\]\)")
    assert strip.sub("MSG", served) == strip.sub("MSG", in_process)


def test_cpu_config_differs_from_gpu_config_only_in_instance_kind() -> None:
    gpu = (MODEL_DIR / "config.pbtxt").read_text()
    cpu = (MODEL_DIR / "configs" / "cpu.pbtxt").read_text()

    def code(text: str) -> list[str]:
        return [line.split("#")[0].rstrip() for line in text.splitlines() if line.split("#")[0].strip()]

    diff = [(g, c) for g, c in zip(code(gpu), code(cpu), strict=True) if g != c]
    assert diff == [("    kind: KIND_GPU", "    kind: KIND_CPU")]


def test_config_declares_the_contract() -> None:
    text = (MODEL_DIR / "config.pbtxt").read_text()
    for needle in (
        f'name: "{MODEL_NAME}"',
        'backend: "python"',
        'name: "TEXT"',
        "data_type: TYPE_STRING",
        'name: "LAST_TOKEN"',
        'name: "MEAN_EMBEDDING"',
        "data_type: TYPE_FP32",
        "dynamic_batching",
        "preferred_batch_size",
        "max_queue_delay_microseconds",
        'key: "model_path"',
        'key: "max_length_tokens"',
    ):
        assert needle in text, needle
    assert int(re.search(r"max_batch_size: (\d+)", text).group(1)) >= 32  # type: ignore[union-attr]


def test_prepare_model_repository_sets_parameters(tmp_path: Path) -> None:
    repo = prepare_model_repository(
        tmp_path / "repo", model_path=Path("/models/x"), max_length_tokens=77, instance_count=2
    )
    for config in (repo / MODEL_NAME / "config.pbtxt", repo / MODEL_NAME / "configs" / "cpu.pbtxt"):
        text = config.read_text()
        assert 'string_value: "/models/x"' in text
        assert 'string_value: "77"' in text
        assert "count: 2" in text
    assert (repo / MODEL_NAME / "1" / "model.py").exists()
