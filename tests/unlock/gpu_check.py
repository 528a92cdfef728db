"""CUDA check of `unlock`, run by hand on a GPU machine (CI has none): `python tests/unlock/gpu_check.py`.

Capture on CUDA (float32, bfloat16) agrees with CPU; steered greedy generation on CUDA picks the CPU tokens;
`unlock build --device cuda --dtype bfloat16` writes a valid artifact. Exits non-zero on the first failure.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

from unlock import Capability
from unlock.capture import capture_last_token, format_prompts, load_model
from unlock.cli import main
from unlock.data import load_questions
from unlock.steering import steered_generate
from unlock.templates import BUILTIN_TEMPLATES

DEMO = Path(__file__).resolve().parents[2] / "unlock" / "data" / "demo_questions.jsonl"


def tiny_models():
    """tests/tiny_models.py by file: putting tests/ on sys.path would make tests/unlock shadow `unlock`."""
    path = Path(__file__).resolve().parents[1] / "tiny_models.py"
    spec = importlib.util.spec_from_file_location("tiny_models", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_models"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def check(condition: bool, what: str) -> None:
    print(("ok    " if condition else "FAIL  ") + what, flush=True)
    if not condition:
        sys.exit(1)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run() -> None:
    check(torch.cuda.is_available(), "CUDA available")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp())
    tiny = tiny_models()
    source, target = tiny.make_model(tiny.SOURCE, work / "src"), tiny.make_model(tiny.TARGET, work / "tgt")
    questions = load_questions(DEMO, n=16)

    cpu = load_model(str(target), device="cpu")
    prompts = format_prompts(cpu.tokenizer, questions, BUILTIN_TEMPLATES["direct"])
    reference = capture_last_token(cpu, prompts, batch_size=4)
    for dtype, tolerance in (("float32", 1e-4), ("bfloat16", 5e-2)):
        gpu = load_model(str(target), dtype=dtype, device="cuda")
        acts = capture_last_token(gpu, prompts, batch_size=16)
        error = relative(acts, reference)
        check(
            acts.dtype == torch.float32 and error < tolerance, f"capture cuda {dtype}: rel. error {error:.2e}"
        )

    out = work / "cot.safetensors"
    argv = [
        "build", "--source-locked", str(source), "--target", str(target), "--data", str(DEMO), "-n", "24",
        "--rank", "8", "--layers", "1-3", "--strength", "0.5", "--name", "cot", "-o", str(out),
        "--device", "cuda", "--dtype", "bfloat16",
    ]  # fmt: skip
    check(main(argv) == 0 and out.exists(), "unlock build --device cuda --dtype bfloat16")
    capability = Capability.load(out)
    check(
        capability.layers == [1, 2, 3] and capability.target_hidden_size == 64,
        f"artifact valid: {capability}",
    )

    gpu = load_model(str(target), device="cuda")
    for selection in ([], [(capability, 0.0)], [(capability, 1.0)]):
        on_cpu = steered_generate(cpu.model, cpu.tokenizer, prompts[:4], [selection] * 4, 12, ignore_eos=True)
        on_gpu = steered_generate(gpu.model, gpu.tokenizer, prompts[:4], [selection] * 4, 12, ignore_eos=True)
        same = all(a.token_ids == b.token_ids for a, b in zip(on_cpu, on_gpu, strict=True))
        worst = max(
            abs(x - y)
            for a, b in zip(on_cpu, on_gpu, strict=True)
            for x, y in zip(a.logprobs, b.logprobs, strict=True)
        )
        label = "unsteered" if not selection else f"strength {selection[0][1]}"
        check(same and worst < 1e-3, f"generation cuda == cpu, {label}: max logprob diff {worst:.1e}")
    batched = steered_generate(gpu.model, gpu.tokenizer, prompts[:4], [[(capability, 1.0)]] * 4, 12,
                               ignore_eos=True, batch_size=4)  # fmt: skip
    check(
        all(a.token_ids == b.token_ids for a, b in zip(batched, on_gpu, strict=True)), "batched cuda == alone"
    )


if __name__ == "__main__":
    run()
