"""`unlock calibrate`: the label-free criterion, the decision, what it reads and what it writes.

The backend here is a stand-in for the served model with the behaviour the criterion is built on (a switch
in a window of strengths, collapse into prompt-independent text above it); tests/server exercises the HTTP
calls it makes against a real server.
"""

from __future__ import annotations

import asyncio
import json
from argparse import Namespace

import pytest
import torch

from unlock.artifacts import Capability, TargetInfo
from unlock.calibrate import Row, decide, measure, table
from unlock.cli import calibration_prompts, main
from unlock.templates import BUILTIN_TEMPLATES, render

SENTINEL = "GOLD-ANSWER-SENTINEL-4711"


class SwitchingModel:
    """Unsteered: a short direct answer. From `on` to `off`: a step-by-step text about its own question.
    From `off`: the same option list whatever the question. Log-likelihood: high when the text quotes the
    prompt's question, else flat (so PMI is large only for on-topic text)."""

    def __init__(self, on: float = 0.04, off: float = 0.08):
        self.on, self.off = on, off
        self.seen: list[str] = []

    async def generate(self, prompt: str, strength: float) -> str:
        self.seen.append(prompt)
        question = prompt.split("Question: ")[1].split("\n")[0]
        if strength >= self.off:
            return "A) 1\nB) 2\nC) 3"
        if strength >= self.on:
            return f"Step 1: read '{question}'. Step 2: compute."
        return "<atok>12"

    async def log_likelihood(self, prompt: str, text: str) -> float:
        self.seen.append(prompt + text)
        question = prompt.split("Question: ")[1].split("\n")[0]
        return -0.5 * len(text) + (5.0 if question in text else 0.0)


def prompts(n: int = 6) -> list[str]:
    return [render(BUILTIN_TEMPLATES["direct"], f"question number {i}?") for i in range(n)]


def test_the_window_is_found_and_the_smallest_best_strength_chosen():
    model = SwitchingModel(on=0.04, off=0.08)
    rows = asyncio.run(measure(model, prompts(), [0.02, 0.04, 0.05, 0.1], progress=False))
    by = {row.strength: row for row in rows}
    assert by[0.02].switched == 0 and by[0.02].qualified == 0
    assert by[0.04].qualified == by[0.05].qualified == 1.0
    assert by[0.1].switched == 1.0 and by[0.1].on_topic == 0 and by[0.1].qualified == 0  # collapsed
    decision = decide(rows, 0.5, 6, 48)
    assert decision.strength == 0.04
    assert "<- chosen" in table(decision).splitlines()[2]
    meta = json.loads(decision.metadata())
    assert meta["criterion"] == "switched-and-on-topic" and meta["strength"] == 0.04
    assert len(meta["rows"]) == 4


def test_no_qualifying_strength_is_a_refusal_not_a_number():
    never = SwitchingModel(on=10.0, off=20.0)  # nothing switches on the grid
    rows = asyncio.run(measure(never, prompts(), [0.01, 0.1], progress=False))
    decision = decide(rows, 0.5, 6, 48)
    assert decision.strength is None and "no strength qualifies" in decision.reason
    collapsing = SwitchingModel(on=0.05, off=0.05)  # switches straight into collapse
    decision = decide(asyncio.run(measure(collapsing, prompts(), [0.05, 0.1], progress=False)), 0.5, 6, 48)
    assert decision.strength is None and "0% of the prompts" in decision.reason


def test_a_window_above_the_grid_is_found_by_extending_it():
    """The best of the grid is its top: larger strengths are tried until the best is no longer the largest."""
    model = SwitchingModel(on=0.25, off=0.5)
    rows = asyncio.run(measure(model, prompts(), [0.05, 0.1, 0.2], progress=False, extend=3))
    assert [row.strength for row in rows] == [0.05, 0.1, 0.2, 0.3, 0.45]
    decision = decide(rows, 0.5, 6, 48)
    assert decision.strength == 0.3 and "largest strength tried" not in decision.reason
    assert [row["strength"] for row in json.loads(decision.metadata())["rows"]][-2:] == [0.3, 0.45]


def test_a_grid_that_already_brackets_the_window_is_not_extended():
    model = SwitchingModel(on=0.04, off=0.08)
    rows = asyncio.run(measure(model, prompts(), [0.02, 0.05, 0.1], progress=False, extend=3))
    assert [row.strength for row in rows] == [0.02, 0.05, 0.1]


def test_a_best_strength_at_the_edge_of_what_was_tried_says_so():
    model = SwitchingModel(on=0.15, off=1.0)
    rows = asyncio.run(measure(model, prompts(), [0.1, 0.2], progress=False, extend=0))
    decision = decide(rows, 0.5, 6, 48)
    assert decision.strength == 0.2 and "largest strength tried" in decision.reason
    extended = asyncio.run(measure(model, prompts(), [0.1, 0.2], progress=False, extend=2))
    assert [row.strength for row in extended] == [0.1, 0.2, 0.3]  # 0.3 only ties: the smallest best stays 0.2
    assert "largest strength tried" not in decide(extended, 0.5, 6, 48).reason


def test_decide_needs_the_fraction():
    rows = [Row(0.05, 0.6, 0.66, 0.4, 3.0, 100.0)]
    assert decide(rows, 0.5, 10, 48).strength is None
    assert decide(rows, 0.4, 10, 48).strength == 0.05


def capability(tmp_path, data_name: str | None) -> Capability:
    target = TargetInfo("Toy", 4, 8, "toy")
    meta = {"field": "question", "locked_template": "direct"}
    if data_name:
        meta["data"] = data_name
    cap = Capability.from_directions("cot", torch.randn(2, 8), [1, 2], "rotate", 0.1, target, metadata=meta)
    cap.save(tmp_path / "cot.safetensors")
    return cap


def test_it_never_reads_an_answer(tmp_path, monkeypatch):
    """The prompts come from the question field only; an answer beside it reaches no request."""
    data = tmp_path / "items.jsonl"
    items = [{"question": f"What is {i} + {i}?", "answer": SENTINEL} for i in range(5)]
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    monkeypatch.chdir(tmp_path)
    cap = capability(tmp_path, "items.jsonl")  # the artifact names its extraction data: the default
    texts = calibration_prompts(Namespace(data=None, field=None, n=4, template=None), cap)
    assert len(texts) == 4 and all(SENTINEL not in t for t in texts)
    assert texts[0] == render(BUILTIN_TEMPLATES["direct"], "What is 0 + 0?")
    model = SwitchingModel()
    asyncio.run(measure(model, texts, [0.05], progress=False))
    assert model.seen and not any(SENTINEL in sent for sent in model.seen)


def test_without_prompts_it_says_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capability(tmp_path, "elsewhere.jsonl")
    code = main(["calibrate", str(tmp_path / "cot.safetensors"), "--url", "http://127.0.0.1:9"])
    assert code == 2
    assert "pass --data" in capsys.readouterr().err


def test_a_calibrated_artifact_keeps_its_directions_and_says_how(tmp_path):
    cap = capability(tmp_path, None)
    rows = [Row(0.05, 1.0, 1.0, 1.0, 9.0, 80.0)]
    calibrated = cap.with_default_strength(0.05, decide(rows, 0.5, 4, 48).metadata())
    assert calibrated.default_strength == 0.05 and cap.default_strength == 0.1
    assert torch.equal(calibrated.target_directions(), cap.target_directions())
    assert json.loads(calibrated.metadata["calibration"])["strength"] == 0.05
    assert calibrated.sha256 != cap.sha256
    calibrated.validate()


@pytest.mark.parametrize("strengths", [[0.0], [-0.1], [float("nan")]])
def test_strengths_must_be_positive(strengths):
    with pytest.raises(ValueError, match="positive"):
        asyncio.run(measure(SwitchingModel(), prompts(), strengths, progress=False))
