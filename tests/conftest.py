"""Shared fixtures (the tiny source and target models of `tiny_models.py`, built once per test session) and
the `engine` marker with its guard (`engine_guard.py`)."""

from __future__ import annotations

from pathlib import Path

import engine_guard
import pytest
from tiny_models import SOURCE, TARGET, make_model


def pytest_collection_modifyitems(config, items):
    for item in items:
        if engine_guard.is_engine_test(item.nodeid):
            item.add_marker(pytest.mark.engine)


# Tests not marked `engine` run guarded from their first fixture to their last: launching vLLM fails them.
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("engine") is None:
        engine_guard.install(item.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    if item.get_closest_marker("engine") is None:
        engine_guard.check_no_engine_core(item.nodeid)
    return result


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    engine_guard.uninstall()


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


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """A throwaway PostgreSQL server (tests/postgres_server.py) for the registry's database backend."""
    from postgres_server import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server_url) -> str:
    """A fresh, empty database: one registry's worth of state."""
    from postgres_server import fresh_database

    return fresh_database(postgres_server_url)
