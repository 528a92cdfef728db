"""Shared fixtures: the tiny source and target models of `tiny_models.py`, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import SOURCE, TARGET, make_model


def pytest_addoption(parser):
    group = parser.getgroup("unlock engine tests (tests/patches)")
    group.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="device the engine tests run vLLM on (cuda: vllm 0.33 on a GPU, see scripts/gpu-acceptance.sh)",
    )
    group.addoption(
        "--steering-runner",
        choices=("v1", "v2"),
        default="v1",
        help="model runner of the steering engines (additional_config['unlock']['model_runner'])",
    )


@pytest.fixture(scope="session")
def tiny_source_model(tmp_path_factory) -> Path:
    """Folder of the tiny Llama source (hidden 128, 6 layers, vocab 400)."""
    return make_model(SOURCE, tmp_path_factory.mktemp("tiny-source"))


@pytest.fixture(scope="session")
def tiny_target_model(tmp_path_factory) -> Path:
    """Folder of the tiny Qwen2 target (hidden 64, 4 layers, vocab 300)."""
    return make_model(TARGET, tmp_path_factory.mktemp("tiny-target"))
