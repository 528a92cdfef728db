"""The fast tier's guard (`engine_guard`): it recognises what starts vLLM, stops an unmarked test from
launching it, and every listed engine test still exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import engine_guard
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv, starts",
    [
        ([sys.executable, "-m", "unlock_server.cli", "--model", "m"], True),
        (["/venv/bin/unlock-serve", "--port", "0"], True),
        ([sys.executable, "tests/patches/engine_job.py", "spec.json", "out.json"], True),
        (["vllm", "serve", "m"], True),
        ("unlock-serve --help", True),
        ([sys.executable, "-m", "unlock.cli", "inspect", "x.safetensors"], False),
        (["true"], False),
    ],
)
def test_launchers_are_recognised(argv, starts):
    assert engine_guard._launches_engine(argv) is starts


def test_an_unmarked_test_cannot_launch_a_server():
    # This test is unmarked, so conftest already runs it guarded.
    with pytest.raises(pytest.fail.Exception, match="is not marked `engine`"):
        subprocess.run([sys.executable, "-m", "unlock_server.cli", "--help"], capture_output=True)
    assert subprocess.run(["true"]).returncode == 0  # anything else still runs


def test_every_listed_engine_test_module_exists():
    for pattern in engine_guard.ENGINE_TESTS:
        module = pattern.split("::")[0]
        assert list(REPO.glob(module)), f"ENGINE_TESTS names {module!r}, which matches no file"
