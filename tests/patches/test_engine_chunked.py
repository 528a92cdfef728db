"""Chunked prefill (a 32-token step budget) with prefix caching: `rotate` hits exactly the last prompt token
of a prompt spread over several steps, and a follow-up turn never reuses a block rotated mid-prompt."""

from __future__ import annotations

import pytest
from conftest import PROMPTS, assert_matches_oracle, register_list, run_job, wire

BUDGET = 32  # max_num_batched_tokens: the prefill chunk
MAX_TOKENS = 8
LONG_A = " ".join(PROMPTS[:3])  # 129 tokens: five chunks
LONG_B = " ".join(PROMPTS[3:6])
FOLLOW_UP_EXTRA = [40, 41, 42, 43, 44, 45]  # token ids of the next user turn


@pytest.fixture(scope="module")
def chunked_results(tiny_target_model, capabilities, tmp_path_factory):
    def req(prompt, selection):
        return {"prompt": prompt, "selection": wire(capabilities, selection)}

    phases = [
        {"register": register_list(capabilities, ["rotA", "rotC", "addB"])},
        {"requests": [req(LONG_A, [("rotA", 1.0)])]},
        {
            "requests": [
                req(LONG_B, [("addB", 0.5), ("rotC", 1.0)]),
                req(PROMPTS[6], []),
                req(PROMPTS[7], [("rotA", 0.5)]),
            ]
        },
        {"requests": [req(PROMPTS[0], [("rotA", 1.0)])]},
        {
            "requests": [
                {
                    "extend": {"phase": 3, "extra": FOLLOW_UP_EXTRA},
                    "selection": wire(capabilities, [("rotA", 1.0)]),
                }
            ]
        },
    ]
    spec = {
        "model": str(tiny_target_model),
        "plugin": True,
        "eager": True,
        "prefix_caching": True,
        "max_num_batched_tokens": BUDGET,
        "max_tokens": MAX_TOKENS,
        "phases": phases,
    }
    return run_job(spec, tmp_path_factory.mktemp("chunked"))


def test_long_prompt_rotated_once_at_its_last_token(chunked_results, oracle, hf_target):
    _, tokenizer = hf_target
    assert len(tokenizer(LONG_A).input_ids) > 3 * BUDGET, "the prompt must span several prefill chunks"
    phase = chunked_results["phases"][1]
    # A rotate-only request steers exactly one token in the whole run: its last prompt token.
    assert phase["status"]["steered_tokens"] == 1, phase["status"]
    [want] = oracle([LONG_A], [[("rotA", 1.0)]], MAX_TOKENS)
    assert_matches_oracle(phase["outputs"][0], want, "rotate over chunked prefill")


def test_mixed_batch_under_chunked_prefill(chunked_results, oracle):
    outputs = chunked_results["phases"][2]["outputs"]
    selections = [[("addB", 0.5), ("rotC", 1.0)], [], [("rotA", 0.5)]]
    wants = oracle([LONG_B, PROMPTS[6], PROMPTS[7]], selections, MAX_TOKENS)
    for got, want, selection in zip(outputs, wants, selections, strict=True):
        assert_matches_oracle(got, want, f"chunked {selection}")


def test_follow_up_turn_does_not_reuse_rotated_block(chunked_results, oracle_ids):
    first = chunked_results["phases"][3]["outputs"][0]
    follow = chunked_results["phases"][4]["outputs"][0]
    # The first turn's prompt ends inside block 1 and its answer fills that block, so the block is cached.
    assert 32 < len(first["prompt_token_ids"]) < 64 <= len(first["prompt_token_ids"]) + MAX_TOKENS
    want = oracle_ids(follow["prompt_token_ids"], [("rotA", 1.0)], MAX_TOKENS)
    assert_matches_oracle(follow, want, "follow-up turn")
    assert follow["cached"] == 32, f"expected only block 0 reused, got {follow['cached']} cached tokens"
