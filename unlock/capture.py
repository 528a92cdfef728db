"""Load a Hugging Face causal LM and read its residual stream at the last prompt token (or at every token).

The stream after decoder layer l is that layer's output, taken with a forward hook. (``output_hidden_states``
is not used: in transformers its last entry is the stream after the final norm, not after the last layer.)
Prompts are left-padded so the last prompt token of every row sits at position -1; position ids are computed
from the attention mask, so a padded row sees the same positions as the prompt run alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from unlock.layers import find_decoder_layers, hidden_size_of
from unlock.templates import render, wrap_chat

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A causal LM ready for capture and steering, with the facts an artifact records about it."""

    name: str
    model: nn.Module
    tokenizer: object
    layers: nn.ModuleList  # the decoder layers, in order

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return hidden_size_of(self.model)

    @property
    def architecture(self) -> str:
        architectures = getattr(self.model.config, "architectures", None)
        return architectures[0] if architectures else type(self.model).__name__

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_model(
    name_or_path: str, dtype: str = "float32", device: str = "auto", layers_path: str | None = None
) -> LoadedModel:
    """Load model and tokenizer (transformers ``from_pretrained``), in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    model = model.to(resolve_device(device)).eval()
    return LoadedModel(name_or_path, model, tokenizer, find_decoder_layers(model, layers_path))


def format_prompts(tokenizer, questions: Sequence[str], template: str, chat: bool = False) -> list[str]:
    prompts = [render(template, q) for q in questions]
    return [wrap_chat(tokenizer, p) for p in prompts] if chat else prompts


def encode(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """Token ids as vLLM makes them for a plain-text prompt (default special tokens); a chat-wrapped prompt
    already carries its special tokens, so none are added."""
    return list(tokenizer(prompt, add_special_tokens=not chat).input_ids)


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each int64 [B, T], prompts aligned on the right."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq) == 0:
            raise ValueError(f"prompt {row} encodes to no tokens")
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return input_ids, mask, positions


def forward_kwargs(model: nn.Module) -> dict:
    """Ask for the last position's logits only, where the model supports it (saves most LM-head work)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def stream_of(output) -> torch.Tensor:
    """A decoder layer's output stream: the tensor itself, or the first item of an older-style tuple."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def hooked_batches(
    lm: LoadedModel, prompts: Sequence[str], batch_size: int, chat: bool, desc: str | None
) -> Iterator[tuple[list[list[int]], list[torch.Tensor]]]:
    """Run the prompts in left-padded batches; yield each batch's token ids and, per decoder layer, its
    output stream [B, T, hidden] (model dtype, on the model's device; T = the batch's longest prompt)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    current: list[torch.Tensor | None] = [None] * lm.num_layers

    def make_hook(index: int):
        def hook(module, args, output):
            current[index] = stream_of(output)

        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(lm.layers)]
    try:
        device, pad_id, extra = lm.device, pad_id_of(lm.tokenizer), forward_kwargs(lm.model)
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc or f"capture {lm.name}", unit="batch", disable=None):
            ids = [encode(lm.tokenizer, p, chat) for p in prompts[start : start + batch_size]]
            input_ids, mask, positions = left_pad(ids, pad_id)
            lm.model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=False,
                **extra,
            )
            yield ids, list(current)  # type: ignore[arg-type]
    finally:
        for handle in handles:
            handle.remove()


def capture_last_token(
    lm: LoadedModel, prompts: Sequence[str], batch_size: int = 8, chat: bool = False, desc: str | None = None
) -> torch.Tensor:
    """Residual stream after every decoder layer at each prompt's last token: float32 [N, layers, hidden]."""
    rows = [
        torch.stack([s[:, -1, :].float().cpu() for s in streams], dim=1)  # [B, num_layers, hidden]
        for _, streams in hooked_batches(lm, prompts, batch_size, chat, desc)
    ]
    acts = torch.cat(rows)  # [N, num_layers, hidden]
    check_finite(acts, lm.name)
    return acts


def capture_all_positions(
    lm: LoadedModel,
    prompts: Sequence[str],
    batch_size: int = 8,
    chat: bool = False,
    desc: str | None = None,
    dtype: torch.dtype = torch.float16,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Every prompt token's stream after every layer: the token ids per prompt, and per layer the rows of all
    prompts one after the other, [sum of prompt lengths, hidden] in ``dtype`` (float16 halves the memory of
    all-position captures; values past its range are refused, not clipped)."""
    all_ids: list[list[int]] = []
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(lm.num_layers)]
    for ids, streams in hooked_batches(lm, prompts, batch_size, chat, desc):
        width = streams[0].shape[1]
        all_ids.extend(ids)
        for layer, stream in enumerate(streams):
            rows = [stream[b, width - len(seq) :] for b, seq in enumerate(ids)]  # the padding is left
            per_layer[layer].append(torch.cat(rows).to(dtype).cpu())  # [sum T_b, hidden]
    layers = [torch.cat(chunks) for chunks in per_layer]
    check_finite(torch.stack(layers, dim=1), lm.name, rows_of=[len(i) for i in all_ids])
    return all_ids, layers


def check_finite(acts: torch.Tensor, model_name: str, rows_of: list[int] | None = None) -> None:
    """Refuse NaN/Inf activations [rows, layers, hidden], naming the first bad layer and prompts (broken
    weights, dtype overflow). ``rows_of``: the number of rows of each prompt, when a prompt has several."""
    bad = ~torch.isfinite(acts).all(dim=-1)  # [rows, num_layers]
    if bad.any():
        rows_hit, layers_hit = bad.nonzero(as_tuple=True)
        first_layer = int(layers_hit.min())
        hit = rows_hit[layers_hit == first_layer]
        if rows_of is not None:  # row -> prompt
            hit = torch.bucketize(hit, torch.tensor(rows_of).cumsum(0), right=True)
        rows = sorted({int(p) for p in hit})
        raise ValueError(
            f"non-finite activations (NaN/Inf) from {model_name!r} at decoder layer {first_layer} "
            f"for prompts "
            f"{rows[:10]}{' ...' if len(rows) > 10 else ''}; check the model weights, or use --dtype float32"
        )
