"""Reference steering for Hugging Face models: the oracle the vLLM patch is tested against.

Forward hooks on the decoder layers apply ``unlock.ops.steer_hidden`` (the same function the engine runs) to
each layer's output. A batch holds prompts that each switch on their own capabilities at their own strengths:
row 1 + b of every table is prompt b's composed row (row 0 is zero), and per-token indices pick the rows.
``rotate`` edits only the last prompt token during prefill; ``add`` edits every token, generated ones too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from unlock.artifacts import Capability
from unlock.capture import encode, forward_kwargs, left_pad, pad_id_of, stream_of
from unlock.layers import find_decoder_layers, hidden_size_of
from unlock.ops import SteeringTerm, compose_rows, steer_hidden

Selection = Sequence[tuple[Capability, float]]  # the capabilities one prompt switches on, with strengths


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log-probability of each chosen token
    text: str = ""


class SteeringHooks:
    """**Installs forward hooks on ``layers`` while entered**; they are removed on exit.

    ``set_batch`` composes each prompt's selection into per-layer tables; ``set_tokens`` says which rows the
    next forward's tokens use. Outside a batch, or with no tokens set, the hooks leave outputs untouched.
    """

    def __init__(self, layers: nn.ModuleList, hidden_size: int):
        self.layers, self.hidden_size = layers, hidden_size
        self._handles: list = []
        self._add = self._rot = None  # [num_layers, 1 + B, d] tables
        self._add_live = self._rot_live = None  # [num_layers, 1 + B] bool: row r is non-zero at layer l
        self._add_index = self._rot_index = None  # [B, T] int64 for the next forward

    def __enter__(self) -> SteeringHooks:
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def set_batch(self, selections: Sequence[Selection], device: torch.device) -> None:
        num_layers, d = len(self.layers), self.hidden_size
        add = torch.zeros(num_layers, 1 + len(selections), d)
        rot = torch.zeros(num_layers, 1 + len(selections), d)
        for b, selection in enumerate(selections):
            terms = []
            for capability, strength in selection:
                capability.check_target(num_layers, d)
                terms.append(
                    SteeringTerm(capability.mode, strength, capability.layers, capability.target_directions())
                )
            add[:, 1 + b], rot[:, 1 + b] = compose_rows(terms, num_layers, d)
        self._add, self._rot = add.to(device), rot.to(device)
        # A zero row is "not steered": rotating by it would be the identity up to rounding, so it is skipped.
        self._add_live, self._rot_live = self._add.ne(0).any(-1), self._rot.ne(0).any(-1)

    def prompt_rows(self) -> torch.Tensor:
        """Row index of each prompt in the tables: [B] = 1..B."""
        return torch.arange(1, self._add.shape[1], device=self._add.device)

    def set_tokens(self, add_index: torch.Tensor | None, rot_index: torch.Tensor | None) -> None:
        self._add_index, self._rot_index = add_index, rot_index

    def _hook(self, layer: int):
        def hook(module, args, output):
            if self._add_index is None:
                return None
            stream = stream_of(output)  # [B, T, d]
            b, t, d = stream.shape
            # Tokens whose row is zero at this layer point at row 0, so they come back bit-identical.
            add_index = self._add_index * self._add_live[layer][self._add_index]  # [B, T]
            rot_index = self._rot_index * self._rot_live[layer][self._rot_index]  # [B, T]
            flat = stream.reshape(b * t, d)
            flat = steer_hidden(
                flat, None, self._add[layer], self._rot[layer], add_index.reshape(-1), rot_index.reshape(-1)
            )  # HF's layer output is the whole stream: residual=None
            steered = flat.reshape(b, t, d)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook


def eos_ids_of(model: nn.Module, tokenizer) -> set[int]:
    """End-of-sequence ids as vLLM reads them: the generation config's (int or list) and the tokenizer's."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    hooks: SteeringHooks,
    prompt_ids: Sequence[Sequence[int]],
    selections: Sequence[Selection],
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
) -> list[Generation]:
    """Greedy decoding of one left-padded batch with a KV cache; each row stops at its first EOS (kept)."""
    device = next(model.parameters()).device
    hooks.set_batch(selections, device)
    input_ids, mask, positions = (x.to(device) for x in left_pad(prompt_ids, pad_id))
    rows = hooks.prompt_rows()  # [B]
    batch, width = input_ids.shape
    # Prefill: `add` rows on every real prompt token, `rotate` rows on the last prompt token only.
    add_index = rows[:, None] * mask  # [B, T]
    rot_index = torch.zeros_like(add_index)
    rot_index[:, -1] = rows
    results = [Generation() for _ in range(batch)]
    done = [False] * batch
    cache, extra = None, forward_kwargs(model)
    for _step in range(max_new_tokens):
        hooks.set_tokens(add_index, rot_index)
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
        cache = out.past_key_values
        logprobs = out.logits[:, -1, :].float().log_softmax(-1)  # [B, vocab]
        chosen = logprobs.argmax(-1)  # [B]
        for b in range(batch):
            if not done[b]:
                token = int(chosen[b])
                results[b].token_ids.append(token)
                results[b].logprobs.append(float(logprobs[b, token]))
                done[b] = token in eos_ids
        if all(done):
            break
        # Decode: one new token per row, `add` rows only; generated tokens are never rotated.
        input_ids = chosen[:, None]
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
        add_index, rot_index = rows[:, None].clone(), torch.zeros(batch, 1, dtype=torch.long, device=device)
    hooks.set_tokens(None, None)
    return results


def steered_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    selections: Sequence[Selection],
    max_new_tokens: int,
    *,
    batch_size: int = 1,
    ignore_eos: bool = False,
    chat: bool = False,
    layers: nn.ModuleList | None = None,
) -> list[Generation]:
    """Greedy generation with prompt i steered by ``selections[i]`` (a list of (Capability, strength)).

    Prompts are tokenized as vLLM tokenizes plain text (``tokenizer(prompt).input_ids``). With the default
    ``batch_size=1`` each prompt runs alone, without padding, for exact comparison with an engine; larger
    batches left-pad and give the same tokens up to float rounding. Hooks are removed on return.
    """
    if len(selections) != len(prompts):
        raise ValueError(
            f"{len(prompts)} prompts but {len(selections)} selections; give one selection per prompt"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    layers = layers if layers is not None else find_decoder_layers(model)
    eos_ids = set() if ignore_eos else eos_ids_of(model, tokenizer)
    prompt_ids = [encode(tokenizer, p, chat) for p in prompts]
    results: list[Generation] = []
    with SteeringHooks(layers, hidden_size_of(model)) as hooks:
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            results += generate_batch(
                model,
                hooks,
                prompt_ids[chunk],
                selections[chunk],
                max_new_tokens,
                eos_ids,
                pad_id_of(tokenizer),
            )
    for result in results:
        result.text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return results
