"""HF reference steering: the DESIGN equations at the right tokens, per-prompt selections, hook hygiene."""

from __future__ import annotations

import pytest
import torch

from unlock import ArtifactError, Capability, TargetInfo
from unlock.capture import encode, load_model, pad_id_of
from unlock.steering import SteeringHooks, eos_ids_of, generate_batch, steered_generate

PROMPTS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\nAnswer:\n",
    "The quick brown fox jumps over the lazy dog.\n",
    "Reason step by step before giving the final answer.\n",
]


@pytest.fixture(scope="module")
def lm(tiny_target_model):
    return load_model(str(tiny_target_model), device="cpu")


def capability(lm, mode: str, layers: list[int], seed: int, strength: float = 0.5) -> Capability:
    directions = torch.randn(len(layers), lm.hidden_size, generator=torch.Generator().manual_seed(seed)) * 3.0
    info = TargetInfo(lm.architecture, lm.num_layers, lm.hidden_size, lm.name)
    return Capability.from_directions(f"{mode}{seed}", directions, layers, mode, strength, info)


def test_unsteered_generation_matches_transformers_generate(lm):
    ours = steered_generate(lm.model, lm.tokenizer, PROMPTS[:1], [[]], 10, ignore_eos=True)[0]
    ids = torch.tensor([encode(lm.tokenizer, PROMPTS[0])])
    theirs = lm.model.generate(
        ids,
        do_sample=False,
        max_new_tokens=10,
        min_new_tokens=10,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert ours.token_ids == theirs.sequences[0, ids.shape[1] :].tolist()
    # Raw logits: the scores would include min_new_tokens' suppression of EOS.
    expected = [
        float(x[0].float().log_softmax(-1)[t]) for x, t in zip(theirs.logits, ours.token_ids, strict=True)
    ]
    assert ours.logprobs == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("mode", ["rotate", "add"])
def test_strength_zero_is_exactly_unsteered_and_a_positive_strength_is_not(lm, mode):
    cap = capability(lm, mode, list(range(lm.num_layers)), seed=1)
    base = steered_generate(lm.model, lm.tokenizer, PROMPTS, [[]] * 3, 12, ignore_eos=True)
    zero = steered_generate(lm.model, lm.tokenizer, PROMPTS, [[(cap, 0.0)]] * 3, 12, ignore_eos=True)
    strong = steered_generate(lm.model, lm.tokenizer, PROMPTS, [[(cap, 1.0)]] * 3, 12, ignore_eos=True)
    for b, z, s in zip(base, zero, strong, strict=True):
        assert z.token_ids == b.token_ids and z.logprobs == b.logprobs
        assert s.token_ids != b.token_ids


class Probe:
    """Records each decoder layer's output in every forward: a hook added before the steering hooks sees the
    unsteered stream, one added after sees the steered stream."""

    def __init__(self, layers):
        self.outputs: list[list[torch.Tensor]] = [[] for _ in layers]
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index):
        def hook(module, args, output):
            self.outputs[index].append((output[0] if isinstance(output, tuple) else output).detach().clone())

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def run_probed(lm, selection, prompt=PROMPTS[0], steps=3):
    """Generate `steps` tokens for one prompt; returns (before, after) per layer per forward: [1, T, d]."""
    before = Probe(lm.layers)
    try:
        with SteeringHooks(lm.layers, lm.hidden_size) as hooks:
            after = Probe(lm.layers)
            try:
                ids = [encode(lm.tokenizer, prompt)]
                generate_batch(lm.model, hooks, ids, [selection], steps, set(), pad_id_of(lm.tokenizer))
            finally:
                after.remove()
    finally:
        before.remove()
    return before.outputs, after.outputs


def test_rotate_edits_only_the_last_prompt_token_and_keeps_its_norm(lm):
    steered_layers, strength = [1, 2], 0.8
    cap = capability(lm, "rotate", steered_layers, seed=2)
    before, after = run_probed(lm, [(cap, strength)])
    directions = cap.target_directions()
    for layer in range(lm.num_layers):
        prefill_in, prefill_out = before[layer][0][0], after[layer][0][0]  # [T, d]
        # Generated tokens are never edited: their effect comes through the KV cache.
        for step in range(1, 3):
            assert torch.equal(before[layer][step], after[layer][step])
        if layer not in steered_layers:
            assert torch.equal(prefill_in, prefill_out)
            continue
        assert torch.equal(prefill_in[:-1], prefill_out[:-1])  # every earlier prompt token untouched
        s, r = prefill_in[-1], directions[steered_layers.index(layer)]
        u = s / s.norm() + strength * r / r.norm()
        torch.testing.assert_close(prefill_out[-1], s.norm() * u / u.norm(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefill_out[-1].norm(), s.norm(), rtol=1e-6, atol=0)
        assert not torch.allclose(prefill_out[-1], s)


def test_add_edits_every_token_including_generated_ones(lm):
    steered_layers, strength = [0, 3], 0.4
    cap = capability(lm, "add", steered_layers, seed=3)
    before, after = run_probed(lm, [(cap, strength)])
    directions = cap.target_directions()
    for layer in range(lm.num_layers):
        for step in range(3):
            x, y = before[layer][step][0], after[layer][step][0]  # [T, d]; T = 1 when decoding
            if layer in steered_layers:
                expected = x + strength * directions[steered_layers.index(layer)]
                torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
            else:
                assert torch.equal(x, y)


def test_each_prompt_in_a_batch_gets_its_own_capabilities(lm):
    rot_a, rot_b = capability(lm, "rotate", [0, 1, 2, 3], seed=4), capability(lm, "rotate", [1, 2], seed=5)
    add = capability(lm, "add", [2], seed=6)
    selections = [[(rot_a, 0.6), (add, 0.5)], [], [(rot_b, 0.9)]]
    batched = steered_generate(lm.model, lm.tokenizer, PROMPTS, selections, 10, ignore_eos=True, batch_size=3)
    for prompt, selection, together in zip(PROMPTS, selections, batched, strict=True):
        alone = steered_generate(lm.model, lm.tokenizer, [prompt], [selection], 10, ignore_eos=True)[0]
        assert together.token_ids == alone.token_ids
        assert together.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    unsteered = steered_generate(lm.model, lm.tokenizer, PROMPTS[:1], [[]], 10, ignore_eos=True)[0]
    assert batched[0].token_ids != unsteered.token_ids


def test_several_capabilities_compose_by_summing_strengths(lm):
    cap = capability(lm, "rotate", [1, 2], seed=7)
    twice = steered_generate(
        lm.model, lm.tokenizer, PROMPTS[:1], [[(cap, 0.3), (cap, 0.5)]], 8, ignore_eos=True
    )
    once = steered_generate(lm.model, lm.tokenizer, PROMPTS[:1], [[(cap, 0.8)]], 8, ignore_eos=True)
    assert twice[0].token_ids == once[0].token_ids
    assert twice[0].logprobs == pytest.approx(once[0].logprobs, abs=1e-5)


def test_generation_stops_at_eos_and_keeps_it(lm):
    eos = eos_ids_of(lm.model, lm.tokenizer)
    assert lm.tokenizer.eos_token_id in eos
    free = steered_generate(lm.model, lm.tokenizer, PROMPTS[:1], [[]], 6, ignore_eos=True)[0]
    # Make the third generated token an end of sequence by declaring it one.
    lm.model.generation_config.eos_token_id = free.token_ids[2]
    try:
        stopped = steered_generate(lm.model, lm.tokenizer, PROMPTS[:1], [[]], 6)[0]
    finally:
        lm.model.generation_config.eos_token_id = lm.tokenizer.eos_token_id
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[2]) + 1]


def test_hooks_are_removed_even_when_a_capability_does_not_fit(lm):
    wrong = Capability.from_directions(
        "wrong", torch.ones(1, 128), [0], "rotate", 0.1, TargetInfo("LlamaForCausalLM", 6, 128, "tiny-source")
    )
    with pytest.raises(ArtifactError, match="6 layers, hidden size 128"):
        steered_generate(lm.model, lm.tokenizer, PROMPTS[:1], [[(wrong, 0.1)]], 4)
    assert all(len(layer._forward_hooks) == 0 for layer in lm.layers)
    steered_generate(lm.model, lm.tokenizer, PROMPTS[:1], [[]], 2)
    assert all(len(layer._forward_hooks) == 0 for layer in lm.layers)


def test_selections_must_match_prompts(lm):
    with pytest.raises(ValueError, match="one selection per prompt"):
        steered_generate(lm.model, lm.tokenizer, PROMPTS, [[]], 4)


def test_ablate_projects_the_direction_out_of_every_token(lm):
    steered_layers = [1, 3]
    cap = capability(lm, "ablate", steered_layers, seed=8)
    for strength in (1.0, 0.5):
        before, after = run_probed(lm, [(cap, strength)])
        units = cap.table_rows()
        for layer in range(lm.num_layers):
            for step in range(3):  # the default positions of ablate: every token, generated ones too
                x, y = before[layer][step][0], after[layer][step][0]  # [T, d]
                if layer not in steered_layers:
                    assert torch.equal(x, y)
                    continue
                r = units[steered_layers.index(layer)]
                expected = x - strength * (x @ r)[:, None] * r  # [T, d]
                torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
                if strength == 1.0:
                    assert (y @ r).abs().max() < 1e-4 * x.norm(dim=-1).max()  # the component is gone


@pytest.mark.parametrize(
    ("positions", "prompt_edited", "last_edited", "generated_edited"),
    [
        ("last_prompt", False, True, False),
        ("prompt", True, True, False),
        ("generated", False, False, True),
        ("all", True, True, True),
    ],
)
@pytest.mark.parametrize("mode", ["add", "rotate", "ablate"])
def test_positions_select_the_edited_tokens(
    lm, mode, positions, prompt_edited, last_edited, generated_edited
):
    """Every operator at every position selector, chosen per request (the capability's own default is
    overridden by the selection's third element)."""
    cap = capability(lm, mode, [2], seed=9)
    before, after = run_probed(lm, [(cap, 0.7, positions)])
    x, y = before[2][0][0], after[2][0][0]  # prefill [T, d]
    assert torch.equal(x[:-1], y[:-1]) != prompt_edited
    assert torch.equal(x[-1], y[-1]) != last_edited
    for step in (1, 2):
        assert torch.equal(before[2][step], after[2][step]) != generated_edited


def test_a_layer_applies_ablate_then_add_then_rotate(lm):
    """Ablations are measured on the incoming stream, the add follows, the rotation comes last."""
    ablate, add, rotate = (
        capability(lm, mode, [1], seed=10 + i) for i, mode in enumerate(["ablate", "add", "rotate"])
    )
    before, after = run_probed(lm, [(rotate, 0.4, "all"), (add, 0.6), (ablate, 1.0)], steps=1)
    x, y = before[1][0][0], after[1][0][0]  # [T, d]
    a_unit, r_unit = ablate.table_rows()[0], rotate.table_rows()[0]
    s = x - (x @ a_unit)[:, None] * a_unit + 0.6 * add.target_directions()[0]
    u = s / s.norm(dim=-1, keepdim=True) + 0.4 * r_unit
    expected = s.norm(dim=-1, keepdim=True) * u / u.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_unknown_positions_are_refused(lm):
    cap = capability(lm, "add", [1], seed=13)
    with pytest.raises(ValueError, match="unknown positions 'middle'"):
        steered_generate(lm.model, lm.tokenizer, PROMPTS[:1], [[(cap, 0.5, "middle")]], 2)
