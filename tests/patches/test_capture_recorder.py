"""The capture recorder (`unlock_vllm.capture`) on hand-made batch layouts, without an engine: which flat
rows of a step it reads, across chunked prefill and a recompute after preemption, and what `take` returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load
from unlock_vllm.capture import CAPTURE_KEY, Recorder, capture_args


class Params:
    def __init__(self, extra):
        self.extra_args = extra


def stream(tokens: int, positions: list[int], hidden: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and residual whose sum at a row is the position of that row's token (per request)."""
    value = torch.tensor(positions, dtype=torch.float32)[:, None].expand(tokens, hidden)
    return value / 4, value * 3 / 4


def step(recorder, layer_ids, req_ids, scheduled, computed, prompt, positions):
    recorder.plan(req_ids, np.array(scheduled), np.array(computed), np.array(prompt))
    hidden, residual = stream(sum(scheduled), positions)
    for layer in layer_ids:
        recorder.record(layer, hidden, residual)


def test_rows_across_chunks_and_a_recompute_come_back_once_in_order():
    recorder = Recorder([0, 1, 2], records=True)
    recorder.admit("cap", Params({CAPTURE_KEY: capture_args("c", 0, [0, 2], "all")}))
    recorder.admit("last", Params({CAPTURE_KEY: capture_args("c", 1, [1], "last")}))
    recorder.admit("other", Params(None))
    assert recorder.live and set(recorder.requests) == {"cap", "last"}
    # Step 1: "other" decodes (1 token), "cap" prefills positions 0-3 of 6, "last" 0-2 of 5.
    step(
        recorder,
        [0, 1, 2],
        ["other", "cap", "last"],
        [1, 4, 3],
        [9, 0, 0],
        [5, 6, 5],
        [9, 0, 1, 2, 3, 0, 1, 2],
    )
    # Preempted, then recomputed from 2 (positions 2-5): 2 and 3 arrive twice. "last" reaches its last token.
    step(recorder, [0, 1, 2], ["last", "cap"], [2, 4], [3, 2], [5, 6], [3, 4, 2, 3, 4, 5])
    got = load(recorder.take("c"))
    assert got["0.positions"].tolist() == [0, 1, 2, 3, 4, 5]
    assert got["0.layer.0"][:, 0].tolist() == [0, 1, 2, 3, 4, 5] and "0.layer.1" not in got
    assert torch.equal(got["0.layer.2"], got["0.layer.0"])
    assert got["1.positions"].tolist() == [4] and got["1.layer.1"][:, 0].tolist() == [4]
    assert recorder.held_bytes == 0 and recorder.take("c") == b""


def test_no_capture_request_means_no_step_and_no_rows():
    recorder = Recorder([0], records=True)
    recorder.admit("plain", Params({"unlock": "[]"}))
    step(recorder, [0], ["plain"], [3], [0], [3], [0, 1, 2])
    assert not recorder.live and recorder.step == [] and recorder.held_bytes == 0


def test_a_rank_that_does_not_record_returns_nothing():
    recorder = Recorder([0], records=False)  # a second TP rank: the stream is rank 0's too
    recorder.admit("cap", Params({CAPTURE_KEY: capture_args("c", 0, [0], "all")}))
    step(recorder, [0], ["cap"], [3], [0], [3], [0, 1, 2])
    assert recorder.live and recorder.take("c") == b""


def test_a_malformed_capture_request_is_ignored():
    recorder = Recorder([0], records=True)
    recorder.admit(
        "bad", Params({CAPTURE_KEY: '{"id": "c", "index": 0, "layers": "all", "positions": "all"}'})
    )
    assert not recorder.live


def test_past_the_held_limit_the_call_fails(monkeypatch):
    monkeypatch.setattr("unlock_vllm.capture.MAX_HELD_BYTES", 40)
    recorder = Recorder([0], records=True)
    recorder.admit("cap", Params({CAPTURE_KEY: capture_args("c", 0, [0], "all")}))
    step(recorder, [0], ["cap"], [3], [0], [3], [0, 1, 2])  # 3 rows x 4 floats = 48 bytes
    with pytest.raises(RuntimeError, match="uncollected capture rows"):
        recorder.take("c")
    assert recorder.held_bytes == 0 and recorder.take("c") == b""
