"""The steps behind `unlock extract`, `unlock align` and `unlock build`, with the time each one took."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from unlock._version import __version__
from unlock.align import FULL_RANK, FitSettings, align, rank_label, split_indices
from unlock.artifacts import Capability, TargetInfo, read_header_metadata, serialize, write_atomic
from unlock.capture import LoadedModel, capture_last_token, format_prompts, load_model
from unlock.data import load_questions
from unlock.directions import extract_directions
from unlock.layers import parse_layer_spec
from unlock.ops import POSITIONS as STEER_POSITIONS
from unlock.ops import operator
from unlock.pairing import POSITIONS
from unlock.rows import alignment_rows
from unlock.streams import Chunk, capture_streams
from unlock.templates import load_template, template_label
from unlock.validation import Limits

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
    # The defaults are what carried the direction in the transfer experiment (docs/unlock.md, "Defaults"):
    # every token pair, centred, full rank, a ridge chosen by cross-validated map error.
    ranks: tuple[int, ...] = (FULL_RANK,)  # several: the one of lowest held-out error (FitSettings)
    center: bool = True
    ridges: tuple[float, ...] = (0.1, 0.3, 1.0)  # relative to X_s^T X_s (unlock.align); 0: the paper's pinv
    holdout: float = 0.0  # fraction of alignment texts left out of the fit and scored on
    cv_folds: int = 5  # with holdout 0: the error by k-fold cross-validation over texts (< 2: none)
    seed: int = 0
    align_positions: str = "auto"  # all (every shared token boundary), last, or all where possible
    align_data: str | None = None  # alignment corpus (JSONL); None: the extraction prompts
    align_field: str = "question"
    align_n: int | None = None  # first N texts of the corpus; None: all
    align_template: str | None = None  # None: the extraction's locked template
    align_skip: int = 2  # first positions left out of token-level pairs (attention sinks)
    capture_dir: str | None = None  # all-position store (resumable, reused); None: a temporary one
    layers: str = "all"
    select_layers: int | None = None  # steer only the K of `layers` with the lowest held-out map error
    mode: str = "rotate"
    positions: str | None = None  # which tokens it edits by default; None: the mode's default
    strength: float = 0.1
    store: str = "factors"  # or "directions": dense target directions


@dataclass
class CaptureConfig:
    """`unlock capture`: every token's stream of one model on a corpus, into a resumable store."""

    model: str
    data: str
    capture_dir: str
    field: str = "question"
    n: int | None = None  # None: every record
    template: str = "direct"


@dataclass
class Extracted:
    """Step 2's output: a direction per source layer, plus what alignment needs to reuse the same prompts."""

    directions: torch.Tensor  # [n_s, d_s]
    locked_acts: torch.Tensor  # [N, n_s, d_s], source-locked activations
    metadata: dict[str, str]  # includes the questions and the locked template text
    # [N, n_s, d_s], source-unlocked activations: kept for research (split-half reliability of the direction);
    # None in files written before they were saved
    unlocked_acts: torch.Tensor | None = None

    @property
    def questions(self) -> list[str]:
        return json.loads(self.metadata["questions"])

    def save(self, path: str | Path) -> None:
        tensors = {"directions": self.directions, "locked_activations": self.locked_acts}
        if self.unlocked_acts is not None:
            tensors["unlocked_activations"] = self.unlocked_acts
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
        unlocked = tensors.get("unlocked_activations")
        if unlocked is not None and unlocked.shape != acts.shape:
            raise ValueError(f"{path}: its unlocked activations do not have the shape of its locked ones")
        if not all(torch.isfinite(x).all() for x in (directions, acts, unlocked) if x is not None):
            raise ValueError(f"{path}: holds non-finite values")
        return cls(directions, acts, meta, unlocked)


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
    check_steering_options(align_config)
    check_align(align_config, n)
    parse_layer_spec(align_config.layers, models.get(align_config.target).num_layers)


def check_align(config: AlignConfig, n_extract: int) -> int:
    """Check the alignment settings; returns the number of alignment texts."""
    if config.align_positions not in POSITIONS:
        raise ValueError(f"unknown --align-positions {config.align_positions!r}; expected one of {POSITIONS}")
    if config.align_skip < 0:
        raise ValueError(f"--align-skip must be >= 0, got {config.align_skip}")
    if not config.ranks or min(config.ranks) < 1:
        raise ValueError(f"--rank must be one or more integers >= 1, got {list(config.ranks)}")
    if not config.ridges or any(r < 0 or not math.isfinite(r) for r in config.ridges):
        raise ValueError(f"--ridge must be finite numbers >= 0, got {list(config.ridges)}")
    if config.align_template is not None:
        load_template(config.align_template)
    if config.align_data is not None:
        n = len(load_questions(config.align_data, config.align_field, config.align_n))
    elif config.align_n is not None:
        raise ValueError("--align-n needs --align-data (the extraction prompts are all used)")
    else:
        n = n_extract
    n_fit = len(split_indices(n, config.holdout, config.seed)[0])
    if config.select_layers is not None and (
        config.select_layers < 1 or (config.holdout == 0 and config.cv_folds < 2)
    ):
        raise ValueError(
            f"--select-layers {config.select_layers} picks layers by their held-out map error: it needs "
            "K >= 1 and an error (--cv-folds >= 2 or --holdout > 0)"
        )
    if len(config.ranks) * len(config.ridges) > 1 and config.holdout == 0 and config.cv_folds < 2:
        raise ValueError(
            "several --rank or --ridge values are chosen among by their held-out map error: it needs "
            "--cv-folds >= 2 or --holdout > 0 (the default --ridge is 0.1,0.3,1: give one value)"
        )
    if config.holdout == 0 and config.cv_folds >= 2 and config.cv_folds > n_fit:
        raise ValueError(
            f"--cv-folds {config.cv_folds} needs at least {config.cv_folds} alignment texts, there are "
            f"{n_fit}; "
            "lower it, or use --cv-folds 0 for no held-out error"
        )
    return n


def same_model(a: str, b: str) -> bool:
    """Whether two model names point at the same model (folders compared by their resolved paths)."""
    pa, pb = Path(a), Path(b)
    return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b


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
    return Extracted(directions, locked_acts, metadata, unlocked_acts)


def run_capture(config: CaptureConfig, models: ModelCache) -> list[Chunk]:
    """Fill the store of ``config.model`` with its streams on the corpus (chunks already there are kept)."""
    opts = models.options
    template = load_template(config.template)
    questions = load_questions(config.data, config.field, config.n)
    lm = models.get(config.model)
    prompts = format_prompts(lm.tokenizer, questions, template, opts.chat)
    with models.timer.stage("capture"):
        return capture_streams(lm, prompts, config.capture_dir, opts.batch_size, opts.chat)


def run_align(extracted: Extracted, config: AlignConfig, models: ModelCache) -> tuple[Capability, list[int]]:
    """Fit each steered layer's map (capturing what it needs) and package the capability.

    When the target is the source-locked model itself, no map is fit: the identity stores the source's own
    directions (a self-map fit on few prompts would only lose part of them). Returns the capability and the
    source layer each steered target layer was mapped from.
    """
    timer = models.timer
    check_steering_options(config)
    if config.store not in ("factors", "directions"):
        raise ValueError(f"unknown --store {config.store!r}; expected 'factors' or 'directions'")
    target = models.get(config.target)
    layers = parse_layer_spec(config.layers, target.num_layers)
    info = TargetInfo(target.architecture, target.num_layers, target.hidden_size, target.name)
    common = dict(layers=layers, mode=config.mode, default_strength=config.strength, target=info)
    meta = {key: extracted.metadata[key] for key in CARRIED_KEYS}
    if config.positions is not None:
        meta["positions"] = config.positions
    if same_model(extracted.metadata["source_locked"], target.name):
        if config.select_layers is not None:
            raise ValueError("--select-layers ranks layers by their map error; a same-model build fits none")
        if extracted.directions.shape != (target.num_layers, target.hidden_size):
            raise ValueError(f"the extracted directions do not fit {target.name!r}, though it is the source")
        directions = extracted.directions[layers]
        meta.update(alignment="identity", source_layers=json.dumps(layers))
        return checked(Capability.from_directions(config.name, directions, **common, metadata=meta)), layers
    check_align(config, len(extracted.questions))
    settings = FitSettings(
        tuple(config.ranks), config.center, tuple(config.ridges), config.holdout, config.cv_folds, config.seed
    )
    with ExitStack() as stack:
        rows, n_texts, align_meta = alignment_rows(extracted, config, target, models, stack)
        with timer.stage("align"):
            fitted = align(rows, n_texts, int(meta["source_num_layers"]), target.num_layers, layers, settings)
            directions = fitted.target_directions(extracted.directions)  # [len(layers), d_t]
    if config.select_layers is not None:
        if config.select_layers > len(layers):
            raise ValueError(f"--select-layers {config.select_layers} is more than the {len(layers)} layers")
        meta.update(
            layer_selection=f"lowest-error:{config.select_layers}",
            candidate_layers=json.dumps(layers),
            candidate_errors=json.dumps([round(e, 6) for e in fitted.errors]),
        )
        keep = sorted(sorted(range(len(layers)), key=lambda i: fitted.errors[i])[: config.select_layers])
        fitted, directions = fitted.subset(keep), directions[keep]
        layers = fitted.target_layers
        common["layers"] = layers
    meta.update(align_meta)
    meta.update(
        alignment="fit",
        source_layers=json.dumps(fitted.source_layers),
        n_fit=str(fitted.n_fit),
        n_holdout=str(fitted.n_holdout),
        n_pairs=str(fitted.n_pairs),
        split_seed=str(config.seed),
        rank=str(fitted.rank),
        rank_requested=rank_label(fitted.rank_asked),
        center=str(config.center).lower(),
        ridge=repr(float(fitted.ridge)),
        cv_folds=str(config.cv_folds),
        error_kind=fitted.error_kind,
    )
    if len(fitted.grid_errors) > 1:
        meta["grid_errors"] = json.dumps(
            {
                f"rank={rank_label(rank)},ridge={ridge!r}": round(e, 6)
                for (rank, ridge), e in fitted.grid_errors.items()
            }
        )
    if fitted.error_kind != "none":
        meta["alignment_errors"] = json.dumps([round(e, 6) for e in fitted.errors])
    if config.store == "directions":
        return checked(
            Capability.from_directions(config.name, directions, **common, metadata=meta)
        ), fitted.source_layers
    maps = fitted.maps
    factors = (
        extracted.directions[fitted.source_layers],  # [L, d_s]
        torch.stack([m.v_s for m in maps]),  # [L, d_s, k]
        torch.stack([m.m for m in maps]),  # [L, k, k]
        torch.stack([m.v_t for m in maps]),  # [L, d_t, k]
    )
    capability = Capability.from_factors(config.name, *factors, **common, metadata=meta)
    return checked(capability), fitted.source_layers


def check_steering_options(config: AlignConfig) -> None:
    """--mode, --positions and --strength, before any capture (the artifact validator checks them again)."""
    operator(config.mode)
    if config.positions is not None and config.positions not in STEER_POSITIONS:
        raise ValueError(f"unknown --positions {config.positions!r}; expected one of {STEER_POSITIONS}")
    limit = Limits().max_strength
    if not math.isfinite(config.strength) or abs(config.strength) > limit:
        raise ValueError(f"--strength must be a finite number within ±{limit:g}, got {config.strength}")


def checked(capability: Capability) -> Capability:
    """The capability, if the server would accept it (the one validator, with the default limits)."""
    capability.validate()
    return capability


# Settings of the extraction step that the capability records as they are.
CARRIED_KEYS = (
    "source_locked", "source_unlocked", "source_architecture", "source_num_layers", "source_hidden_size",
    "data", "field", "n", "aggregation", "locked_template", "unlocked_template", "chat_template", "dtype",
)  # fmt: skip
