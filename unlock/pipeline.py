"""The steps behind `unlock extract`, `unlock align` and `unlock build`, with the time each one took."""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path

import torch

from unlock._version import __version__
from unlock.align import FitSettings, align, rank_label, split_indices
from unlock.artifacts import Capability, TargetInfo
from unlock.capture import LoadedModel, capture_last_token, format_prompts
from unlock.configs import AlignConfig, CaptureConfig, ExtractConfig
from unlock.data import load_questions
from unlock.directions import extract_directions
from unlock.extracted import EXTRACTED_TAG, EXTRACTED_VERSION, Extracted
from unlock.identity import (
    PATH_KEYS,
    identity,
    model_name,
    model_path,
    source_model,
    with_legacy_paths,
)
from unlock.layers import parse_layer_spec
from unlock.model_cache import ModelCache
from unlock.ops import POSITIONS as STEER_POSITIONS
from unlock.ops import operator
from unlock.pairing import POSITIONS
from unlock.rows import alignment_rows
from unlock.streams import Chunk
from unlock.targets import Target, capture_target_streams, recorded, served, target_of, target_prompts
from unlock.templates import load_template, template_label
from unlock.validation import Limits


def check_build(extract: ExtractConfig, align_config: AlignConfig, models: ModelCache) -> None:
    """Fail on bad data, templates, split or layers before `unlock build` starts its slow part (capture)."""
    load_template(extract.locked_template)
    load_template(extract.unlocked_template)
    n = len(load_questions(extract.data, extract.field, extract.n))
    check_steering_options(align_config)
    check_align(align_config, n)
    target = target_of(align_config, models, models.options.chat)  # a served one: its server answers
    parse_layer_spec(align_config.layers, target.num_layers)


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


def is_source(extracted: Extracted, config: AlignConfig, target: Target) -> bool:
    """Whether the target is the extraction's source-locked model: by folder when both are folders here and
    the source's is known (a build, --source-locked, a file extracted with --record-paths), else by name and
    config hash (a served target's from its server)."""
    if isinstance(target, LoadedModel):
        try:
            return same_model(source_model(extracted.metadata, config.source_locked), target.name)
        except ValueError:  # a name only
            pass
    meta = with_legacy_paths(extracted.metadata)
    return (meta["source_locked"], meta.get("source_locked_config_sha256")) == recorded(target)


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
        "source_locked": model_name(locked.name),
        "source_unlocked": model_name(unlocked.name),
        **identity("source_locked", locked),  # the paths stay in memory unless --record-paths (`save`)
        **identity("source_unlocked", unlocked),
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
    """Fill the store of the model (``config.model``, or the one served at ``config.model_url``) with its
    streams on the corpus (chunks already there are kept)."""
    opts = models.options
    template = load_template(config.template)
    questions = load_questions(config.data, config.field, config.n)
    if (config.model is None) == (config.model_url is None):
        raise ValueError("give the model as one of --model FOLDER and --model-url URL")
    model: Target = (
        models.get(config.model)
        if config.model is not None
        else served(config.model_url, config.admin_key, None, models, opts.chat)
    )
    prompts = target_prompts(model, questions, template, opts.chat)
    with models.timer.stage("capture"):
        return capture_target_streams(model, prompts, config.capture_dir, opts.batch_size, opts.chat)


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
    chat = models.options.chat or extracted.metadata["chat_template"] == "true"
    target = target_of(config, models, chat)
    layers = parse_layer_spec(config.layers, target.num_layers)
    target_name, target_hash = recorded(target)
    info = TargetInfo(target.architecture, target.num_layers, target.hidden_size, target_name)
    common = dict(layers=layers, mode=config.mode, default_strength=config.strength, target=info)
    source = with_legacy_paths(extracted.metadata)  # names, also from files that recorded folders there
    meta = {key: source[key] for key in CARRIED_KEYS}
    meta.update({key: source[key] for key in IDENTITY_KEYS if key in source})
    meta["target_config_sha256"] = target_hash
    if config.record_paths:  # the builder's folders, only when asked for (a served target has none here)
        meta.update({key: source[key] for key in PATH_KEYS if key in source})
        if isinstance(target, LoadedModel):
            meta["target_path"] = model_path(target.name)
    if config.positions is not None:
        meta["positions"] = config.positions
    if is_source(extracted, config, target):
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
# Carried too when the extracted file has them (files written before they were recorded do not).
IDENTITY_KEYS = ("source_locked_config_sha256", "source_unlocked_config_sha256")
