"""`unlock combine`: the expression, the combined rows, provenance, refusals, and (HF reference) the combined
capability steering exactly as the same selection made per request."""

from __future__ import annotations

import json

import pytest
import torch

from unlock import ArtifactError, Capability, TargetInfo
from unlock.cli import main
from unlock.combine import combine, parse_expression

TARGET = TargetInfo("Qwen2ForCausalLM", 4, 64, "tiny-target")


def make(name, mode, layers, seed, target=TARGET, **meta):
    directions = torch.randn(len(layers), target.hidden_size, generator=torch.Generator().manual_seed(seed))
    return Capability.from_directions(name, directions, layers, mode, 0.5, target, meta or None)


def test_parse_expression():
    assert parse_expression("0.5*cot + math - verbose") == [(0.5, "cot"), (1.0, "math"), (-1.0, "verbose")]
    assert parse_expression("-2*a-b + c-d.safetensors") == [(-2.0, "a-b"), (1.0, "c-d.safetensors")]
    assert parse_expression("1e-1*x") == [(0.1, "x")]
    bad_inputs = [("", "empty"), ("a +", "ends with"), ("a b", "expected '\\+' or '-'"), ("*a", "term")]
    for bad, message in bad_inputs:
        with pytest.raises(ValueError, match=message):
            parse_expression(bad)


@pytest.mark.parametrize("mode", ["add", "rotate"])
def test_combined_rows_are_the_weighted_sum_of_table_rows(mode):
    a, b = make("a", mode, [0, 2], 1), make("b", mode, [2, 3], 2)
    combined = combine([(0.5, a), (-1.0, b)], "ab", expression="0.5*a - b")
    assert combined.layers == [0, 2, 3] and combined.mode == mode and combined.default_strength == 1.0
    assert combined.row_norm == "stored" and combined.positions == a.positions
    ra, rb = a.table_rows(), b.table_rows()
    expected = torch.stack([0.5 * ra[0], 0.5 * ra[1] - rb[0], -rb[1]])
    torch.testing.assert_close(combined.table_rows(), expected)
    provenance = json.loads(combined.metadata["combined_from"])
    assert provenance == [
        {"name": "a", "sha256": a.sha256, "weight": 0.5},
        {"name": "b", "sha256": b.sha256, "weight": -1.0},
    ]
    assert combined.metadata["combine_expression"] == "0.5*a - b"
    assert Capability.from_bytes(combined.to_bytes()).sha256 == combined.sha256


def test_what_does_not_combine_is_refused():
    add, rot = make("add", "add", [1], 1), make("rot", "rotate", [1], 2)
    with pytest.raises(ValueError, match="one mode only"):
        combine([(1.0, add), (1.0, rot)], "x")
    with pytest.raises(ValueError, match="ablate capabilities do not combine"):
        combine([(1.0, make("ab", "ablate", [1], 3))], "x")
    with pytest.raises(ValueError, match="edits generated tokens but .add. edits all"):
        combine([(1.0, add), (1.0, make("g", "add", [1], 4, positions="generated"))], "x")
    other = TargetInfo("Qwen2ForCausalLM", 4, 64, "another-model")
    with pytest.raises(ValueError, match="one target only"):
        combine([(1.0, add), (1.0, make("o", "add", [1], 5, target=other))], "x")
    with pytest.raises(ValueError, match="appears twice"):
        combine([(1.0, add), (2.0, add)], "x")
    with pytest.raises(ValueError, match="zero at every layer"):
        combine([(1.0, add), (-1.0, make("add2", "add", [1], 1))], "x")
    with pytest.raises(ArtifactError, match="default_strength 20"):
        combine([(1.0, add)], "x", default_strength=20)


def test_cli_combine_writes_and_inspect_shows_provenance(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, seed in [("cot", 1), ("math", 2), ("verbose", 3)]:
        make(name, "rotate", [1, 2], seed).save(tmp_path / f"{name}.safetensors")
    assert main(["combine", "0.5*cot + math - verbose", "--name", "blend", "-o", "blend.safetensors"]) == 0
    blend = Capability.load(tmp_path / "blend.safetensors")
    assert [t["name"] for t in json.loads(blend.metadata["combined_from"])] == ["cot", "math", "verbose"]
    capsys.readouterr()
    assert main(["inspect", "blend.safetensors"]) == 0
    assert "combined    0.5*cot" in capsys.readouterr().out
    assert main(["combine", "cot + nothere", "--name", "x", "-o", "x.safetensors"]) == 2
    assert "no capability file 'nothere'" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("mode", ["add", "rotate"])
def test_combined_capability_steers_as_the_selection_per_request(tiny_target_model, mode):
    from unlock.capture import load_model
    from unlock.steering import steered_generate

    lm = load_model(str(tiny_target_model), device="cpu")
    info = TargetInfo(lm.architecture, lm.num_layers, lm.hidden_size, lm.name)
    a, b = make("a", mode, [1, 2], 6, target=info), make("b", mode, [2, 3], 7, target=info)
    blend = combine([(0.5, a), (-1.0, b)], "blend")
    prompts = ["Question: Tom has 3 apples and buys 5 more. How many?\nAnswer:\n", "The quick brown fox\n"]
    strength = 3.0
    served = steered_generate(lm.model, lm.tokenizer, prompts, [[(blend, strength)]] * 2, 8, ignore_eos=True)
    per_request = steered_generate(
        lm.model, lm.tokenizer, prompts, [[(a, 0.5 * strength), (b, -strength)]] * 2, 8, ignore_eos=True
    )
    plain = steered_generate(lm.model, lm.tokenizer, prompts, [[]] * 2, 8, ignore_eos=True)
    for got, want, base in zip(served, per_request, plain, strict=True):
        assert got.token_ids == want.token_ids
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        assert got.token_ids != base.token_ids
