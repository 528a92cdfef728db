"""The steps behind `unlock extract`, `unlock align` and `unlock build`, with the time each one took."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from unlock._version import __version__
from unlock.align import align, split_indices
from unlock.artifacts import Capability, TargetInfo, read_header_metadata, serialize, write_atomic
from unlock.capture import LoadedModel, capture_last_token, format_prompts, load_model
from unlock.data import load_questions
from unlock.directions import extract_directions
from unlock.layers import parse_layer_spec
from unlock.ops import MODES
from unlock.templates import load_template, template_label

EXTRACTED_TAG = "unlock.extracted"
EXTRACTED_VERSION = "1"


@dataclass
class Timer:
    """Wall time per named stage, in the order the stages first ran."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def report(self) -> str:
        total = sum(self.stages.values()) or 1.0
        lines = [
            f"  {name:<28} {seconds:8.2f} s {100 * seconds / total:5.1f}%"
            for name, seconds in self.stages.items()
        ]
        return "\n".join(["where the time went:", *lines, f"  {'total':<28} {total:8.2f} s"])


@dataclass
class ModelOptions:
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 8
    chat: bool = False  # wrap prompts in each model's chat template
    layers_module: str | None = None  # explicit decoder-layer path, else found by search


@dataclass
class ExtractConfig:
    source_locked: str
    data: str
    source_unlocked: str | None = None  # None: the locked model with the unlocked template
    field: str = "question"
    n: int = 64
    locked_template: str = "direct"
    unlocked_template: str = "cot"
    aggregation: str = "mean"


@dataclass
class AlignConfig:
    target: str
    name: str
    rank: int = 32
    center: bool = False
    holdout: float = 0.2
    seed: int = 0
    layers: str = "all"
    mode: str = "rotate"
    strength: float = 0.1
    store: str = "factors"  # or "directions": dense target directions


@dataclass
class Extracted:
    """Step 2's output: a direction per source layer, plus what alignment needs to reuse the same prompts."""

    directions: torch.Tensor  # [n_s, d_s]
    locked_acts: torch.Tensor  # [N, n_s, d_s], source-locked activations
    metadata: dict[str, str]  # includes the questions and the locked template text

    @property
    def questions(self) -> list[str]:
        return json.loads(self.metadata["questions"])

    def save(self, path: str | Path) -> None:
        tensors = {"directions": self.directions, "locked_activations": self.locked_acts}
        write_atomic(path, serialize(tensors, self.metadata))

    @classmethod
    def load(cls, path: str | Path) -> Extracted:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"extracted file {str(path)!r} does not exist; write one with `unlock extract`")
        data = path.read_bytes()
        try:
            meta = read_header_metadata(data)
            tensors = load_safetensors(data)
        except (ValueError, SafetensorError) as err:
            raise ValueError(f"{path}: not a readable `unlock extract` file: {err}") from None
        if meta.get("format") != EXTRACTED_TAG or meta.get("format_version") != EXTRACTED_VERSION:
            raise ValueError(
                f"{path}: format {meta.get('format')!r} v{meta.get('format_version')}, "
                f"expected {EXTRACTED_TAG!r} v{EXTRACTED_VERSION}; write it with `unlock extract`"
            )
        directions, acts = tensors.get("directions"), tensors.get("locked_activations")
        n = len(json.loads(meta["questions"]))
        if directions is None or acts is None or acts.shape[0] != n or acts.shape[1:] != directions.shape:
            raise ValueError(f"{path}: tensors disagree with each other or with its {n} questions")
        if not (torch.isfinite(directions).all() and torch.isfinite(acts).all()):
            raise ValueError(f"{path}: holds non-finite values")
        return cls(directions, acts, meta)


class ModelCache:
    """Loads each model once per command: the same-model and source-is-target cases reuse the instance."""

    def __init__(self, options: ModelOptions, timer: Timer):
        self.options, self.timer, self.models = options, timer, {}

    def get(self, name: str) -> LoadedModel:
        if name not in self.models:
            with self.timer.stage(f"load {Path(name).name or name}"):
                o = self.options
                self.models[name] = load_model(name, o.dtype, o.device, o.layers_module)
        return self.models[name]


def check_build(extract: ExtractConfig, align_config: AlignConfig, models: ModelCache) -> None:
    """Fail on bad data, templates, split or layers before `unlock build` starts its slow part (capture)."""
    load_template(extract.locked_template)
    load_template(extract.unlocked_template)
    n = len(load_questions(extract.data, extract.field, extract.n))
    split_indices(n, align_config.holdout, align_config.seed)
    parse_layer_spec(align_config.layers, models.get(align_config.target).num_layers)


def run_extract(config: ExtractConfig, models: ModelCache) -> Extracted:
    """Capture the source with and without the capability; reduce the differences to a direction per layer."""
    opts, timer = models.options, models.timer
    locked_template = load_template(config.locked_template)
    unlocked_template = load_template(config.unlocked_template)
    questions = load_questions(config.data, config.field, config.n)
    locked = models.get(config.source_locked)
    unlocked = models.get(config.source_unlocked or config.source_locked)
    if (unlocked.num_layers, unlocked.hidden_size) != (locked.num_layers, locked.hidden_size):
        raise ValueError(
            f"source-unlocked {unlocked.name!r} "
            f"({unlocked.num_layers} layers, hidden {unlocked.hidden_size}) must have the shape of "
            f"source-locked {locked.name!r} "
            f"({locked.num_layers} layers, hidden {locked.hidden_size})"
        )
    if unlocked is locked and locked_template == unlocked_template:
        raise ValueError("one source model with the same locked and unlocked template gives a zero direction")
    with timer.stage("capture source-locked"):
        prompts = format_prompts(locked.tokenizer, questions, locked_template, opts.chat)
        locked_acts = capture_last_token(locked, prompts, opts.batch_size, opts.chat, "source-locked")
    with timer.stage("capture source-unlocked"):
        prompts = format_prompts(unlocked.tokenizer, questions, unlocked_template, opts.chat)
        unlocked_acts = capture_last_token(unlocked, prompts, opts.batch_size, opts.chat, "source-unlocked")
    with timer.stage("extract directions"):
        directions = extract_directions(locked_acts, unlocked_acts, config.aggregation)
    metadata = {
        "format": EXTRACTED_TAG,
        "format_version": EXTRACTED_VERSION,
        "source_locked": locked.name,
        "source_unlocked": unlocked.name,
        "source_architecture": locked.architecture,
        "source_num_layers": str(locked.num_layers),
        "source_hidden_size": str(locked.hidden_size),
        "data": Path(config.data).name,
        "field": config.field,
        "n": str(len(questions)),
        "aggregation": config.aggregation,
        "locked_template": template_label(config.locked_template),
        "unlocked_template": template_label(config.unlocked_template),
        "locked_template_text": locked_template,
        "chat_template": str(opts.chat).lower(),
        "dtype": opts.dtype,
        "questions": json.dumps(questions),
        "unlock_version": __version__,
    }
    return Extracted(directions, locked_acts, metadata)


def run_align(extracted: Extracted, config: AlignConfig, models: ModelCache) -> tuple[Capability, list[int]]:
    """Capture the target on the locked prompts, fit each steered layer's map and package the capability.

    Returns the capability and the source layer each steered target layer was mapped from.
    """
    opts, timer = models.options, models.timer
    if config.mode not in MODES:
        raise ValueError(f"unknown mode {config.mode!r}; expected one of {MODES}")
    if not math.isfinite(config.strength):
        raise ValueError(f"strength must be a finite number, got {config.strength}")
    if config.store not in ("factors", "directions"):
        raise ValueError(f"unknown --store {config.store!r}; expected 'factors' or 'directions'")
    target = models.get(config.target)
    layers = parse_layer_spec(config.layers, target.num_layers)
    chat = extracted.metadata["chat_template"] == "true"
    with timer.stage("capture target"):
        prompts = format_prompts(
            target.tokenizer, extracted.questions, extracted.metadata["locked_template_text"], chat
        )
        target_acts = capture_last_token(target, prompts, opts.batch_size, chat, "target")
    with timer.stage("align"):
        fitted = align(
            extracted.locked_acts,
            target_acts,
            layers,
            config.rank,
            config.center,
            config.holdout,
            config.seed,
        )
        directions = fitted.target_directions(extracted.directions)  # [len(layers), d_t]
    if config.mode == "rotate" and (directions.norm(dim=-1) == 0).any():
        raise ValueError(
            "a mapped direction is zero (the source direction is orthogonal to the map); try more -n"
        )
    meta = {key: extracted.metadata[key] for key in CARRIED_KEYS}
    meta.update(
        source_layers=json.dumps(fitted.source_layers),
        n_fit=str(fitted.n_fit),
        n_holdout=str(fitted.n_holdout),
        split_seed=str(config.seed),
        rank=str(fitted.rank),
        rank_requested=str(config.rank),
        center=str(config.center).lower(),
    )
    if fitted.n_holdout:
        meta["alignment_errors"] = json.dumps([round(e, 6) for e in fitted.errors])
    info = TargetInfo(target.architecture, target.num_layers, target.hidden_size, target.name)
    common = dict(
        layers=layers, mode=config.mode, default_strength=config.strength, target=info, metadata=meta
    )
    if config.store == "directions":
        return Capability.from_directions(config.name, directions, **common), fitted.source_layers
    maps = fitted.maps
    factors = (
        extracted.directions[fitted.source_layers],  # [L, d_s]
        torch.stack([m.v_s for m in maps]),  # [L, d_s, k]
        torch.stack([m.m for m in maps]),  # [L, k, k]
        torch.stack([m.v_t for m in maps]),  # [L, d_t, k]
    )
    return Capability.from_factors(config.name, *factors, **common), fitted.source_layers


# Settings of the extraction step that the capability records as they are.
CARRIED_KEYS = (
    "source_locked", "source_unlocked", "source_architecture", "source_num_layers", "source_hidden_size",
    "data", "field", "n", "aggregation", "locked_template", "unlocked_template", "chat_template", "dtype",
)  # fmt: skip
