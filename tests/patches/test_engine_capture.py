"""Capture mode on the eager engine: capture requests in a batch with steered and unsteered requests record
the residual stream that the HF forward hook reads (every prompt position once, also across the chunks of a
chunked prefill and for a prompt whose blocks sit in the prefix cache), and leave the other requests'
outputs bit-identical to the same batch without them. Compiled and TP=2 runs: test_engine_compiled.py and
test_engine_tensor_parallel.py."""

from __future__ import annotations

import pytest
from conftest import (
    CAPTURE_PROMPTS,
    EQUIVALENCE_TOKENS,
    capture_phase,
    check_capture,
    equivalence_requests,
    register_list,
    run_job,
)

KEYS = ["rotA", "rotC", "addB", "addD"]
ALL_LAYERS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def capture_results(tiny_target_model, capabilities, tmp_path_factory):
    batch = equivalence_requests(capabilities)
    spec = {
        "model": str(tiny_target_model),
        "plugin": True,
        "eager": True,
        "prefix_caching": True,
        "max_num_batched_tokens": 64,  # the long prompt is prefilled in chunks, beside other requests
        "max_tokens": EQUIVALENCE_TOKENS,
        "phases": [
            {"register": register_list(capabilities, KEYS)},
            {"requests": [{"prompt": p} for p in CAPTURE_PROMPTS]},  # puts their blocks in the prefix cache
            {"requests": batch},
            capture_phase("all-layers", "all", ALL_LAYERS, batch),
            capture_phase("last-two", "last", [1, 3], batch),
            {"capture": {**capture_phase("never-taken", "last", [0], [])["capture"], "take": False}},
        ],
    }
    return run_job(spec, tmp_path_factory.mktemp("capture"))


def test_every_position_equals_the_hf_stream(capture_results, hf_streams):
    check_capture(capture_results["phases"][3]["capture"], hf_streams, "all", ALL_LAYERS)


def test_last_position_of_chosen_layers_equals_the_hf_stream(capture_results, hf_streams):
    check_capture(capture_results["phases"][4]["capture"], hf_streams, "last", [1, 3])


def test_other_requests_are_bit_identical_beside_a_capture(capture_results):
    alone = capture_results["phases"][2]["outputs"]
    for phase in (3, 4):
        beside = capture_results["phases"][phase]["outputs"]
        for i, (got, want) in enumerate(zip(beside, alone, strict=True)):
            assert got["token_ids"] == want["token_ids"], f"phase {phase}, request {i}"
            assert got["logprobs"] == want["logprobs"], f"phase {phase}, request {i}: log-prob bits differ"


def test_a_taken_call_is_forgotten_and_an_untaken_one_is_held(capture_results):
    status = capture_results["status_end"]
    # Only "never-taken" is still held: its 4 prompts' last rows of layer 0, float32.
    assert status["capture_held_bytes"] == 4 * 64 * 4, status
