"""Registration while requests run, through AsyncLLM with the engine core in its own process (the server's
setup): a capability registered mid-run is usable at once; unregistering one that a running request uses
is deferred for that request (its composed rows stay) and refused to later ones, which run unsteered."""

from __future__ import annotations

import pytest
from conftest import PROMPTS, assert_matches_oracle, run_job, wire

MAX_TOKENS = 8
LONG_TOKENS = 300


@pytest.fixture(scope="module")
def async_results(tiny_target_model, capabilities, tmp_path_factory):
    add_b, rot_c = capabilities["addB"], capabilities["rotC"]
    spec = {
        "model": str(tiny_target_model),
        "plugin": True,
        "eager": True,
        "prefix_caching": True,
        "mode": "async_register",
        "max_tokens": MAX_TOKENS,
        "preregister": [add_b.path, add_b.sha256],
        "register": [rot_c.path, rot_c.sha256],
        "long": {
            "prompt": PROMPTS[0],
            "selection": wire(capabilities, [("addB", 0.5)]),
            "max_tokens": LONG_TOKENS,
        },
        "late": {"prompt": PROMPTS[1], "selection": wire(capabilities, [("rotC", 1.0)])},
        "stale": {"prompt": PROMPTS[2], "selection": wire(capabilities, [("addB", 0.5)])},
    }
    return run_job(spec, tmp_path_factory.mktemp("async"))


def test_rpcs_answer_while_a_request_runs(async_results, capabilities):
    assert async_results["preregister"]["ok"] and async_results["register"]["ok"], async_results
    assert async_results["long_running_after_rpcs"], "the long request ended before the RPCs: lengthen it"
    unregister = async_results["unregister"]
    assert unregister == {"ok": True, "error": None, "deferred_for_requests": 1}, unregister
    assert async_results["status_end"]["registered"] == [capabilities["rotC"].sha256]


def test_registered_mid_run_is_usable(async_results, oracle):
    [want] = oracle([PROMPTS[1]], [[("rotC", 1.0)]], MAX_TOKENS)
    assert_matches_oracle(async_results["late"], want, "registered while a request ran")


def test_running_request_keeps_its_steering_after_unregister(async_results, oracle):
    [want] = oracle([PROMPTS[0]], [[("addB", 0.5)]], LONG_TOKENS)
    assert_matches_oracle(async_results["long"], want, "steered request across the unregister")


def test_request_after_unregister_runs_unsteered(async_results, oracle):
    [want] = oracle([PROMPTS[2]], [[]], MAX_TOKENS)
    assert_matches_oracle(async_results["stale"], want, "selection of an unregistered capability")
    assert "runs unsteered" in async_results["log"]
