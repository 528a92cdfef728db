"""What each step of the pipeline is asked to do (`unlock extract`, `align`, `build`, `capture`): the settings
the CLI fills from its flags and the server's demo build from its constants, read by `pipeline` and `rows`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unlock.align import DEFAULT_RANK


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
    target: str | None  # the target's folder (or hub id); None: the model served at `target_url`
    name: str
    # The defaults are what carried the direction in the transfer experiment (docs/unlock.md, "Defaults"):
    # every token pair, centred, rank 128, a ridge chosen by cross-validated map error.
    ranks: tuple[int, ...] = (DEFAULT_RANK,)  # several: the one of lowest held-out error (FitSettings)
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
    # The source-locked model's folder, for an extracted file that records only its name (`unlock align`).
    source_locked: str | None = None
    record_paths: bool = False  # record the models' folders in the artifact (`<role>_path`)
    # A target served by unlock-serve instead of a folder: captured through its admin endpoint.
    target_url: str | None = None  # the server's root, e.g. http://host:8000
    admin_key: str | None = dataclasses.field(default=None, repr=False)  # never printed
    target_model: str | None = None  # one of its served names; None: the server's


@dataclass
class CaptureConfig:
    """`unlock capture`: every token's stream of one model on a corpus, into a resumable store."""

    model: str | None  # the model's folder (or hub id); None: the model served at `model_url`
    data: str
    capture_dir: str
    field: str = "question"
    n: int | None = None  # None: every record
    template: str = "direct"
    model_url: str | None = None  # a model served by unlock-serve, captured through its admin endpoint
    admin_key: str | None = dataclasses.field(default=None, repr=False)  # never printed
