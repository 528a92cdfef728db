"""Find a vLLM model's decoder layers by structure, not by per-architecture attribute names.

A decoder layer is a child of an `nn.ModuleList` that contains a KV-cache attention layer
(`AttentionLayerBase`); its index in that list is its global layer index (pipeline-parallel ranks hold
`PPMissingLayer` placeholders for the layers they do not own, which keeps the indices global).
"""

from __future__ import annotations

from torch import nn


def _has_attention(module: nn.Module) -> bool:
    from unlock_vllm import seams

    AttentionLayerBase = seams.get("AttentionLayerBase")
    return any(isinstance(m, AttentionLayerBase) for m in module.modules())


def find_vllm_decoder_layers(model: nn.Module) -> tuple[str, int, list[tuple[int, nn.Module]]]:
    """Returns (list name, total layer count, [(global index, layer) held by this rank]).

    Raises ValueError when no list, or more than one outermost list, holds attention layers.
    """
    from unlock_vllm import seams

    PPMissingLayer = seams.get("PPMissingLayer")

    candidates: list[tuple[str, nn.ModuleList, list[tuple[int, nn.Module]]]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        layers = [
            (i, child)
            for i, child in enumerate(module)
            if not isinstance(child, PPMissingLayer) and _has_attention(child)
        ]
        if layers:
            candidates.append((name, module, layers))
    # A list nested inside another candidate (e.g. sub-blocks of one layer) is not the decoder stack.
    outermost = [
        c for c in candidates if not any(c[0].startswith(o[0] + ".") for o in candidates if o is not c)
    ]
    if len(outermost) != 1:
        names = [name for name, _, _ in outermost] or ["<none>"]
        raise ValueError(
            f"unlock: expected exactly one nn.ModuleList of decoder layers with attention in "
            f"{type(model).__name__}, found {names}; this architecture needs an entry in the discovery rules"
        )
    name, module_list, layers = outermost[0]
    return name, len(module_list), layers
