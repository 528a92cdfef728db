"""Fixtures for the vLLM patch tests: fabricated capabilities, an engine-job runner and the HF oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("engine_job.py")

# Where the engine jobs run, from --device and --steering-runner (set in pytest_configure, before the test
# modules are collected, so that their parametrisations can depend on it).
ENGINE = {"device": "cpu", "model_runner": "v1"}


def pytest_configure(config):
    ENGINE.update(device=config.getoption("device"), model_runner=config.getoption("steering_runner"))


def cudagraph_modes() -> list[str | None]:
    """The CUDA-graph modes a compiled engine test runs in: both capture modes on CUDA, none on CPU."""
    return ["FULL", "PIECEWISE"] if ENGINE["device"] == "cuda" else [None]


def expected_runner() -> str:
    """The runner class a steering engine of this session must report."""
    if ENGINE["device"] == "cpu":
        return "vllm.v1.worker.cpu_model_runner.CPUModelRunner"
    if ENGINE["model_runner"] == "v2":
        return "vllm.v1.worker.gpu.model_runner.GPUModelRunner"
    return "vllm.v1.worker.gpu_model_runner.GPUModelRunner"


# Prompts of the engine batches: distinct, a few to a few dozen tokens each.
PROMPTS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "The quick brown fox jumps over the lazy dog",
    "Mary had a little lamb whose fleece was white as snow",
    "There are 12 eggs in a dozen. If Sara uses 4 eggs,",
    "A train travels 60 miles in 2 hours. What is its speed",
    "Reason step by step before giving the final answer.",
    "The final answer is 42. The sum of 17 and 25",
    "Solve the following problem and finish with the final answer.",
    "user assistant system hello world numbers 0 1 2 3",
    "Answer: Let's think step by step. Tom starts with 3 apples",
]


@dataclass(frozen=True)
class Cap:
    name: str
    mode: str
    path: str
    sha256: str


@pytest.fixture(scope="session")
def capabilities(tiny_target_model, tmp_path_factory) -> dict[str, Cap]:
    """Random target-space directions saved as real artifacts; `rotA2` is `rotA` re-made with new content;
    `comboR` and `comboA` are `unlock combine` results (`0.5*rotA - rotC`, `addB + 2*addD`)."""
    from tiny_models import TARGET

    from unlock import Capability, TargetInfo
    from unlock.combine import combine

    out = tmp_path_factory.mktemp("capabilities")
    target = TargetInfo("Qwen2ForCausalLM", TARGET.num_layers, TARGET.hidden_size, "tiny-target")
    generator = torch.Generator().manual_seed(1234)
    made = {}
    for key, name, mode, layers in [
        ("rotA", "rotA", "rotate", [1, 2]),
        ("rotC", "rotC", "rotate", [3]),
        ("addB", "addB", "add", [0, 2, 3]),
        ("addD", "addD", "add", [1]),
        ("rotA2", "rotA", "rotate", [1, 2]),
        ("ablE", "ablE", "ablate", [0, 2]),
    ]:
        directions = torch.randn(len(layers), TARGET.hidden_size, generator=generator)  # [L, d]
        path = out / f"{key}.safetensors"
        Capability.from_directions(name, directions, layers, mode, 1.0, target).save(path)
        made[key] = Cap(name, mode, str(path), Capability.load(path).sha256)
    for key, terms in [
        ("comboR", [(0.5, "rotA"), (-1.0, "rotC")]),
        ("comboA", [(1.0, "addB"), (2.0, "addD")]),
    ]:
        loaded = [(weight, Capability.load(made[k].path)) for weight, k in terms]
        combined = combine(loaded, key)
        path = out / f"{key}.safetensors"
        combined.save(path)
        made[key] = Cap(key, combined.mode, str(path), combined.sha256)
    return made


def run_job(spec: dict, work: Path, timeout: int = 600) -> dict:
    """Run engine_job.py on `spec` in a fresh process; fail with its log tail unless it exits cleanly."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {"cache_root": str(work / "vllm-cache"), **ENGINE, **spec}
    spec_path, out_path = work / "spec.json", work / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"} if ENGINE["device"] == "cpu" else dict(os.environ)
    proc = subprocess.run(
        [sys.executable, str(JOB), str(spec_path), str(out_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"engine job failed (rc={proc.returncode}):\n{log[-6000:]}"
    result = json.loads(out_path.read_text())
    result["log"] = log
    return result


@pytest.fixture(scope="session")
def hf_target(tiny_target_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_target_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_target_model)


@pytest.fixture(scope="session")
def oracle(hf_target, capabilities):
    """oracle(prompts, selections, max_tokens): the HF reference, each prompt alone, greedy.

    A selection is [(cap key, strength), ...]; returns `unlock.steering.Generation`s.
    """
    from unlock import Capability
    from unlock.steering import steered_generate

    model, tokenizer = hf_target
    loaded = {key: Capability.load(cap.path) for key, cap in capabilities.items()}

    def run(prompts, selections, max_tokens):
        chosen = [[(loaded[key], *rest) for key, *rest in sel] for sel in selections]
        return steered_generate(model, tokenizer, prompts, chosen, max_tokens, ignore_eos=True)

    return run


@pytest.fixture(scope="session")
def oracle_ids(hf_target, capabilities):
    """oracle_ids(prompt_ids, selection, max_tokens): the HF reference on one prompt given as token ids."""
    from unlock import Capability
    from unlock.capture import pad_id_of
    from unlock.layers import find_decoder_layers, hidden_size_of
    from unlock.steering import SteeringHooks, generate_batch

    model, tokenizer = hf_target
    loaded = {key: Capability.load(cap.path) for key, cap in capabilities.items()}

    def run(prompt_ids, selection, max_tokens):
        chosen = [(loaded[key], strength) for key, strength in selection]
        with SteeringHooks(find_decoder_layers(model), hidden_size_of(model)) as hooks:
            [result] = generate_batch(
                model, hooks, [prompt_ids], [chosen], max_tokens, set(), pad_id_of(tokenizer)
            )
        return result

    return run


def wire(capabilities: dict[str, Cap], selection) -> list[list]:
    """[(cap key, strength[, positions]), ...] -> the [[sha256, strength, mode[, positions]], ...] an engine
    request carries (positions left out: the capability's own, which is its mode's default here)."""
    return [
        [capabilities[key].sha256, strength, capabilities[key].mode, *positions]
        for key, strength, *positions in selection
    ]


def register_list(capabilities: dict[str, Cap], keys) -> list[list[str]]:
    return [[capabilities[key].path, capabilities[key].sha256] for key in keys]


def assert_matches_oracle(got: dict, want, label: str, tol: float | None = None) -> None:
    if tol is None:  # the oracle runs float32 on CPU; a CUDA engine's float32 kernels differ from it more
        tol = 1e-4 if ENGINE["device"] == "cpu" else 2e-3
    assert got["token_ids"] == want.token_ids, (
        f"{label}: engine {got['token_ids']} != oracle {want.token_ids}"
    )
    worst = max(abs(a - b) for a, b in zip(got["logprobs"], want.logprobs, strict=True))
    assert worst < tol, f"{label}: logprobs differ from the oracle by {worst:.2e} (tolerance {tol:.0e})"


# One engine batch, every prompt with its own capability set: (cap key, strength) pairs.
EQUIVALENCE_SELECTIONS = [
    [],
    [("rotA", 1.0)],
    [("addB", 0.5)],
    [("rotA", 0.7), ("rotC", 1.5)],  # two rotates, different strengths
    [("addB", 0.3), ("addD", 0.8)],  # two adds
    [("rotA", 0.6), ("addB", 0.4)],  # both modes
    [],
    [("rotC", -1.0)],
    [("addD", 1.0)],
    [("rotA", 1.0), ("addB", 0.5), ("rotC", 0.5), ("addD", 0.2)],
]
EQUIVALENCE_TOKENS = 8


def equivalence_requests(capabilities: dict[str, Cap]) -> list[dict]:
    return [
        {"prompt": prompt, "selection": wire(capabilities, sel)}
        for prompt, sel in zip(PROMPTS, EQUIVALENCE_SELECTIONS, strict=True)
    ]


# A second batch: every operator and position selector, per request overrides, and the two combined
# capabilities next to the same selection made per request (same prompt). (cap key, strength[, positions]).
OPERATOR_KEYS = ["rotA", "rotC", "addB", "addD", "ablE", "comboR", "comboA"]
OPERATOR_CASES = [
    (PROMPTS[1], [("ablE", 1.0)]),  # ablate at every token (its default)
    (PROMPTS[2], [("ablE", 0.8, "generated"), ("addD", 1.0, "prompt")]),
    (PROMPTS[3], [("addB", 0.5, "generated")]),
    (PROMPTS[4], [("rotA", 0.8, "all")]),
    (PROMPTS[5], [("rotC", 1.0, "prompt"), ("ablE", 0.6, "last_prompt"), ("addB", 0.3, "generated")]),
    (PROMPTS[7], [("comboR", 1.5)]),
    (PROMPTS[7], [("rotA", 0.75), ("rotC", -1.5)]),  # = comboR at 1.5
    (PROMPTS[8], [("comboA", 0.5)]),
    (PROMPTS[8], [("addB", 0.5), ("addD", 1.0)]),  # = comboA at 0.5
]
COMBINED_PAIRS = [(5, 6), (7, 8)]  # (combined, per request) case indices


def operator_requests(capabilities: dict[str, Cap]) -> list[dict]:
    return [{"prompt": prompt, "selection": wire(capabilities, sel)} for prompt, sel in OPERATOR_CASES]


def check_operators(outputs: list[dict], oracle, label: str) -> None:
    """Every operator and position case equals the oracle and visibly steers; a combined capability served
    equals the same selection made per request."""
    prompts = [prompt for prompt, _ in OPERATOR_CASES]
    selections = [sel for _, sel in OPERATOR_CASES]
    want = oracle(prompts, selections, EQUIVALENCE_TOKENS)
    plain = oracle(prompts, [[] for _ in prompts], EQUIVALENCE_TOKENS)
    for i, (got, ref, base, sel) in enumerate(zip(outputs, want, plain, selections, strict=True)):
        assert_matches_oracle(got, ref, f"{label} operator case {i} {sel}")
        assert ref.token_ids != base.token_ids, f"case {i} {sel}: the steering does not change greedy output"
    for combined, per_request in COMBINED_PAIRS:
        a, b = outputs[combined], outputs[per_request]
        assert a["token_ids"] == b["token_ids"], f"{label}: {OPERATOR_CASES[combined][1]} served differs"
        worst = max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True))
        assert worst < 1e-4, f"{label}: combined vs per-request logprobs differ by {worst:.2e}"


def check_equivalence(outputs: list[dict], oracle, label: str) -> None:
    """Every prompt of the engine batch equals the oracle on that prompt alone; steering visibly acts."""
    want = oracle(PROMPTS, EQUIVALENCE_SELECTIONS, EQUIVALENCE_TOKENS)
    plain = oracle(PROMPTS, [[] for _ in PROMPTS], EQUIVALENCE_TOKENS)
    for i, (got, ref, base, sel) in enumerate(zip(outputs, want, plain, EQUIVALENCE_SELECTIONS, strict=True)):
        assert_matches_oracle(got, ref, f"{label} prompt {i} {sel}")
        if sel:
            assert ref.token_ids != base.token_ids, (
                f"prompt {i} {sel}: the strength does not change greedy output"
            )


# Capture mode (`unlock_vllm.capture`): prompts of several KV blocks (32 tokens) and a few shorter ones.
CAPTURE_PROMPTS = [" ".join(PROMPTS[:6]), PROMPTS[0], PROMPTS[3], " ".join(PROMPTS[4:])]


def capture_phase(capture_id: str, positions: str, layers: list[int], requests: list[dict]) -> dict:
    """A phase whose batch holds `requests` and capture requests for CAPTURE_PROMPTS."""
    capture = {"id": capture_id, "prompts": CAPTURE_PROMPTS, "layers": layers, "positions": positions}
    return {"requests": requests, "capture": capture}


@pytest.fixture(scope="session")
def hf_streams(tiny_target_model):
    """The HF reference of the capture prompts: per prompt, float32 [tokens, layers, hidden]."""
    from unlock.capture import capture_all_positions, load_model

    lm = load_model(str(tiny_target_model), "float32", "cpu")
    _, layers = capture_all_positions(lm, CAPTURE_PROMPTS, batch_size=4, dtype=torch.float32)
    rows = torch.stack(layers, dim=1)  # [all tokens, layers, hidden]
    lengths = [len(lm.tokenizer(p).input_ids) for p in CAPTURE_PROMPTS]
    return list(rows.split(lengths))


def check_capture(replies: list[dict], hf: list[torch.Tensor], positions: str, layers: list[int]) -> None:
    """Exactly one rank recorded the call (the first TP rank), and its rows equal the HF reference at every
    requested layer: cosine >= 0.9999 and relative error <= 1e-4 (float32), every prompt position once."""
    assert all(r["ok"] for r in replies), replies
    recorded = [r for r in replies if r["tensors"]]
    assert len(recorded) == 1, [(r["rank"], len(r["tensors"])) for r in replies]
    tensors = {k: torch.tensor(v) for k, v in recorded[0]["tensors"].items()}
    assert recorded[0]["rank"] == 0
    assert len(tensors) == len(hf) * (len(layers) + 1), sorted(tensors)
    for index, want in enumerate(hf):
        tokens = want.shape[0]
        expected = list(range(tokens)) if positions == "all" else [tokens - 1]
        assert tensors[f"{index}.positions"].tolist() == expected, f"prompt {index}"
        for layer in layers:
            got, ref = tensors[f"{index}.layer.{layer}"], want[expected, layer]
            cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1).min().item()
            relative = ((got - ref).norm() / ref.norm()).item()
            assert cosine >= 0.9999 and relative <= 1e-4, (index, layer, cosine, relative)
