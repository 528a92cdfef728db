"""Find a Hugging Face causal LM's decoder layers, generically.

One search for every family: the decoder layers are the single ``nn.ModuleList`` whose qualified name ends in
one of a few known suffixes (Llama/Qwen/Gemma: ``model.layers``; multimodal wrappers:
``language_model.layers``; GPT-2 style: ``transformer.h``). An explicit override wins over the search.
"""

from __future__ import annotations

from torch import nn

# Suffixes of the decoder-layer list in transformers models.
LAYER_SUFFIXES = (
    "language_model.model.layers",
    "language_model.layers",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.layers",
    "transformer.blocks",
    "transformer.h",
    "model.layers",
)

# A model may name its own layer list: `model.unlock_layers_path = "backbone.blocks"`.
OVERRIDE_ATTRIBUTE = "unlock_layers_path"


def find_decoder_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """Return the model's decoder layers, in order.

    ``path`` (or the model attribute ``unlock_layers_path``) names the ``ModuleList`` explicitly, as in
    ``model.named_modules()``; otherwise exactly one ``ModuleList`` must end in a known suffix.
    """
    path = path or getattr(model, OVERRIDE_ATTRIBUTE, None)
    modules = dict(model.named_modules())
    if path is not None:
        found = modules.get(path)
        if not isinstance(found, nn.ModuleList):
            kind = "nothing" if found is None else type(found).__name__
            raise ValueError(
                f"decoder-layer path {path!r} names {kind} in {type(model).__name__}, not a ModuleList"
            )
        return found
    candidates = {
        name: module
        for name, module in modules.items()
        if isinstance(module, nn.ModuleList)
        and any(name == s or name.endswith("." + s) for s in LAYER_SUFFIXES)
    }
    if len(candidates) != 1:
        found_names = sorted(candidates) or "none"
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__}: expected one ModuleList named like "
            f"{LAYER_SUFFIXES}, found {found_names}. Name it explicitly: pass the path "
            f"(e.g. 'model.layers', --layers-module on the command line) or set `model.{OVERRIDE_ATTRIBUTE}`"
        )
    return next(iter(candidates.values()))


def hidden_size_of(model: nn.Module) -> int:
    """The residual-stream width: the text config's hidden_size (multimodal configs nest it)."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


def parse_layer_spec(spec: str, num_layers: int) -> list[int]:
    """Parse ``all``, ``4-12``, ``0,2,5`` or ``-1`` into sorted, distinct, non-negative layer indices.

    Negative indices count from the end (``-1`` is the last layer); ranges are inclusive. Indices are
    normalised here, once, so everything downstream sees 0..num_layers-1.
    """
    text = spec.strip()
    if text == "all":
        return list(range(num_layers))
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            # A range "a-b"; a leading '-' is a sign ("-3-0" is the range -3..0).
            head, sep, tail = part[1:].partition("-") if part.startswith("-") else part.partition("-")
            if part.startswith("-"):
                head = "-" + head
            bounds = (int(head), int(tail)) if sep else (int(head), int(head))
        except ValueError:
            raise ValueError(
                f"bad layer spec {spec!r}: {part!r} is not an index or a range; "
                "use 'all', '4-12', '0,2,5' or '-1'"
            ) from None
        lo, hi = (b + num_layers if b < 0 else b for b in bounds)
        for index in (lo, hi):
            if not 0 <= index < num_layers:
                raise ValueError(
                    f"layer {index if index >= 0 else index - num_layers} in spec {spec!r} is out of range "
                    f"for a model with {num_layers} layers (valid: 0..{num_layers - 1} or -{num_layers}..-1)"
                )
        if lo > hi:
            raise ValueError(f"bad layer range {part!r} in spec {spec!r}: start after end")
        layers.update(range(lo, hi + 1))
    return sorted(layers)
