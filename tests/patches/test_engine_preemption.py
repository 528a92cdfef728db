"""Preemption: with a KV cache too small for the batch, vLLM preempts steered requests (their slots are
freed) and resumes them by recomputation (their rows are composed again); every output still equals the
oracle."""

from __future__ import annotations

import pytest
from conftest import PROMPTS, assert_matches_oracle, register_list, run_job, wire

MAX_TOKENS = 80
MAX_MODEL_LEN = 256
KV_BYTES = 10 * 32 * 1024  # 10 blocks of 32 tokens at 1 KiB per token: 320 tokens for ~1000 needed
SELECTIONS = [
    [("addB", 0.5)],
    [("rotA", 1.0)],
    [],
    [("rotA", 0.7), ("addB", 0.3)],
    [("addB", 0.2)],
    [("rotA", 0.4)],
]
PREEMPT_PROMPTS = PROMPTS[: len(SELECTIONS)]


@pytest.fixture(scope="module")
def preemption_results(tiny_target_model, capabilities, tmp_path_factory):
    requests = [
        {"prompt": p, "selection": wire(capabilities, s)}
        for p, s in zip(PREEMPT_PROMPTS, SELECTIONS, strict=True)
    ]
    spec = {
        "model": str(tiny_target_model),
        "plugin": True,
        "eager": True,
        "prefix_caching": False,
        "kv_cache_bytes": KV_BYTES,
        "max_model_len": MAX_MODEL_LEN,
        "max_tokens": MAX_TOKENS,
        "phases": [{"register": register_list(capabilities, ["rotA", "addB"])}, {"requests": requests}],
    }
    return run_job(spec, tmp_path_factory.mktemp("preemption"))


def test_preempted_requests_equal_oracle(preemption_results, oracle):
    status = preemption_results["status_end"]
    assert status["preempted_requests"] > 0, (
        f"no steered request was preempted; shrink the KV cache: {status}"
    )
    wants = oracle(PREEMPT_PROMPTS, SELECTIONS, MAX_TOKENS)
    for got, want, selection in zip(
        preemption_results["phases"][1]["outputs"], wants, SELECTIONS, strict=True
    ):
        assert_matches_oracle(got, want, f"preempted batch {selection}")
