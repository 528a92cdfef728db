"""Reference steering for Hugging Face models: the oracle the vLLM patch is tested against.

Forward hooks on the decoder layers apply ``unlock.ops.steer_hidden`` (the same function the engine runs) to
each layer's output, with tables built the way the engine builds them: one table row per capability, term
rows per prompt and token class (`unlock.ops.class_terms`), and a term row per token. Each prompt switches on
its own capabilities at its own strengths, each at its own positions (the capability's default, or the one
the selection gives): ``last_prompt`` edits the last prompt token during prefill, ``prompt`` every prompt
token, ``generated`` every generated token, ``all`` every token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from unlock.artifacts import Capability
from unlock.capture import encode, forward_kwargs, left_pad, pad_id_of, stream_of
from unlock.layers import find_decoder_layers, hidden_size_of
from unlock.ops import GENERATED, Term, class_terms, operator, steer_hidden, token_classes

# The capabilities one prompt switches on: (Capability, strength) or (Capability, strength, positions).
Selection = Sequence[tuple]


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log-probability of each chosen token
    text: str = ""


class SteeringHooks:
    """**Installs forward hooks on ``layers`` while entered**; they are removed on exit.

    ``set_batch`` builds the tables for a batch of selections; ``set_tokens`` says which term row each token
    of the next forward uses. Outside a batch, or with no tokens set, the hooks leave outputs untouched.
    """

    def __init__(self, layers: nn.ModuleList, hidden_size: int):
        self.layers, self.hidden_size = layers, hidden_size
        self._handles: list = []
        self._tables: dict[str, torch.Tensor] = {}
        self._rows: list[tuple[int, int, int]] = []  # per prompt: term row of each token class
        self._token_row: torch.Tensor | None = None  # [B, T] int64 for the next forward

    def __enter__(self) -> SteeringHooks:
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def set_batch(self, selections: Sequence[Selection], device: torch.device) -> None:
        num_layers, d = len(self.layers), self.hidden_size
        caps: dict[str, tuple[int, Capability]] = {}  # sha256 -> (table row, capability); row 0 = off
        for selection in selections:
            for capability, *_ in selection:
                capability.check_target(num_layers, d)
                caps.setdefault(capability.sha256, (len(caps) + 1, capability))
        dirs = torch.zeros(num_layers, len(caps) + 1, d)
        gate = torch.zeros(num_layers, len(caps) + 1)
        for index, capability in caps.values():
            dirs[capability.layers, index] = capability.table_rows()
            gate[capability.layers, index] = 1.0
        keys: dict[tuple, int] = {(): 0}  # term row by its terms: equal selections share rows
        self._rows = []
        for selection in selections:
            ordered = sorted(selection, key=lambda item: item[0].sha256)  # the wire's order
            terms = [
                Term(caps[c.sha256][0], float(a), operator(c.mode).code, rest[0] if rest else c.positions)
                for c, a, *rest in ordered
            ]
            self._rows.append(tuple(keys.setdefault(key, len(keys)) for key in class_terms(terms)))
        width = max(1, *(len(key) for key in keys))
        term_cap = torch.zeros(len(keys), width, dtype=torch.int64)
        term_strength = torch.zeros(len(keys), width)
        term_op = torch.zeros(len(keys), width, dtype=torch.int64)
        for key, row in keys.items():
            for j, (cap, strength, op) in enumerate(key):
                term_cap[row, j], term_strength[row, j], term_op[row, j] = cap, strength, op
        self._tables = {
            "dirs": dirs.to(device),
            "gate": gate.to(device),
            "term_cap": term_cap.to(device),
            "term_strength": term_strength.to(device),
            "term_op": term_op.to(device),
        }

    def prefill_rows(self, prompt_lens: Sequence[int], width: int) -> torch.Tensor:
        """[B, width] term rows of left-padded prompts: each token by its class, padding 0."""
        rows = torch.zeros(len(prompt_lens), width, dtype=torch.int64)
        for b, length in enumerate(prompt_lens):
            classes = token_classes(length, 0, length)
            rows[b, width - length :] = torch.tensor([self._rows[b][c] for c in classes], dtype=torch.int64)
        return rows

    def decode_rows(self) -> torch.Tensor:
        """[B, 1] term rows of generated tokens."""
        return torch.tensor([[rows[GENERATED]] for rows in self._rows], dtype=torch.int64)

    def set_tokens(self, token_row: torch.Tensor | None) -> None:
        self._token_row = token_row

    def _hook(self, layer: int):
        def hook(module, args, output):
            if self._token_row is None:
                return None
            stream = stream_of(output)  # [B, T, d]
            b, t, d = stream.shape
            tables = self._tables
            flat = steer_hidden(
                stream.reshape(b * t, d),
                None,  # HF's layer output is the whole stream
                tables["dirs"][layer],
                tables["gate"][layer],
                tables["term_cap"],
                tables["term_strength"],
                tables["term_op"],
                self._token_row.reshape(-1),
            )
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
    batch, width = input_ids.shape
    token_row = hooks.prefill_rows([len(ids) for ids in prompt_ids], width).to(device)  # [B, T]
    results = [Generation() for _ in range(batch)]
    done = [False] * batch
    cache, extra = None, forward_kwargs(model)
    for _step in range(max_new_tokens):
        hooks.set_tokens(token_row)
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
        # Decode: one new token per row, a generated token.
        input_ids = chosen[:, None]
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
        token_row = hooks.decode_rows().to(device)
    hooks.set_tokens(None)
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
    """Greedy generation with prompt i steered by ``selections[i]``: a list of (Capability, strength) or
    (Capability, strength, positions).

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
