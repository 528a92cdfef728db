"""The models of one `unlock` command: each loaded once, with the options every step captures them with.

Every step gets the same cache (`pipeline`, `rows`), so a model that is both source and target, or both
source-locked and source-unlocked, is loaded once, and a served target is asked for its description once;
its timer records each load as a stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unlock.capture import LoadedModel, load_model
from unlock.served import ServedTarget
from unlock.timer import Timer


@dataclass
class ModelOptions:
    """How every model of the command is loaded and fed (the CLI's shared flags)."""

    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 8
    chat: bool = False  # wrap prompts in each model's chat template
    layers_module: str | None = None  # explicit decoder-layer path, else found by search


class ModelCache:
    """Loads each model once per command: the same-model and source-is-target cases reuse the instance."""

    def __init__(self, options: ModelOptions, timer: Timer):
        self.options, self.timer = options, timer
        self.models: dict[str, LoadedModel] = {}
        self.served_models: dict[tuple[str, str | None], ServedTarget] = {}

    def get(self, name: str) -> LoadedModel:
        if name not in self.models:
            with self.timer.stage(f"load {Path(name).name or name}"):
                o = self.options
                self.models[name] = load_model(name, o.dtype, o.device, o.layers_module)
        return self.models[name]

    def served(self, url: str, admin_key: str | None, model: str | None = None) -> ServedTarget:
        """The model unlock-serve serves at ``url`` (``model``: one of its served names; default the
        server's)."""
        if (url, model) not in self.served_models:
            with self.timer.stage(f"connect {url}"):
                self.served_models[url, model] = ServedTarget.connect(url, admin_key, model)
        return self.served_models[url, model]
