"""All-position activations of one model on a text corpus, saved in chunks: a capture resumes where it
stopped, and every later fit (other ranks, ridges, source models) reuses it.

A store is one directory per model (and its dtype and chat wrapping) under a root directory. Each chunk of
``CHUNK_TEXTS`` prompts is one safetensors file named by the hash of those prompts, written to a temporary
file and renamed into place only once complete. It holds ``layer.<l>`` [tokens, hidden] (float16; the prompts'
rows one after the other), ``ids`` and ``ends`` int64 [tokens] (``ends``: the character offset at which each
token ends in its prompt, -1 for a token that covers no text) and ``lengths`` int64 [prompts].
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from unlock.artifacts import write_atomic
from unlock.capture import LoadedModel, capture_all_positions, encode

STREAMS_TAG = "unlock.streams"
STREAMS_VERSION = "1"
CHUNK_TEXTS = 16  # fixed: chunk file names depend on it, so every run finds the chunks of earlier ones


def token_ends(tokenizer, prompt: str, chat: bool = False) -> tuple[list[int], list[int]]:
    """The prompt's token ids (as `encode` makes them) and the character offset where each token ends."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"token-level alignment pairs tokens by character offsets, which need a fast tokenizer; "
            f"{tokenizer.name_or_path!r} has a slow one: use --align-positions last"
        )
    encoded = tokenizer(prompt, add_special_tokens=not chat, return_offsets_mapping=True)
    ends = [end if end > start else -1 for start, end in encoded.offset_mapping]
    return list(encoded.input_ids), ends


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode("utf-8")).hexdigest()


def store_dir(root: str | Path, lm: LoadedModel, chat: bool) -> Path:
    """The store of one loaded model."""
    return store_dir_of(root, lm.name, str(lm.model.dtype), chat, lm.num_layers, lm.hidden_size)


def store_dir_of(
    root: str | Path, name: str, dtype: str, chat: bool, num_layers: int, hidden_size: int
) -> Path:
    """The store of a model: named by its folder name and a hash of what decides its activations (``dtype``
    as torch prints it, e.g. ``torch.float32``)."""
    path = Path(name)
    identity = str(path.resolve()) if path.exists() else name
    key = _digest([identity, dtype, chat, num_layers, hidden_size])
    return Path(root) / f"{path.name or 'model'}-{key[:12]}"


def chunk_paths(directory: Path, prompts: Sequence[str]) -> tuple[list[list[str]], list[Path]]:
    """The prompts in chunks of ``CHUNK_TEXTS``, and the file each chunk is stored in."""
    chunks = [list(prompts[i : i + CHUNK_TEXTS]) for i in range(0, len(prompts), CHUNK_TEXTS)]
    return chunks, [directory / f"chunk-{_digest(chunk)[:24]}.safetensors" for chunk in chunks]


def open_store(directory: Path, prompts: Sequence[str]) -> list[Chunk]:
    """The chunks of a finished capture of ``prompts``; fails naming how many are missing."""
    _, paths = chunk_paths(directory, prompts)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(
            f"{directory}: {len(missing)} of {len(paths)} chunks of these {len(prompts)} prompts are not "
            "captured yet; run `unlock capture` (it resumes) or use fewer texts"
        )
    return [Chunk.open(path) for path in paths]


@dataclass
class Chunk:
    """One chunk file of a store: the token ids and end offsets of its prompts, and its layers on demand."""

    path: Path
    ids: list[list[int]]
    ends: list[list[int]]

    def layer(self, index: int) -> torch.Tensor:
        """The stream after decoder layer ``index`` at every token of the chunk: [tokens, hidden] float16."""
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(f"layer.{index}")

    @classmethod
    def open(cls, path: Path) -> Chunk:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STREAMS_TAG or meta.get("format_version") != STREAMS_VERSION:
                raise ValueError(f"{path}: not an `unlock capture` chunk (format {meta.get('format')!r})")
            ids, ends, lengths = (f.get_tensor(n).tolist() for n in ("ids", "ends", "lengths"))
        bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
        split = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return cls(path, [ids[s] for s in split], [ends[s] for s in split])


def write_chunk(lm: LoadedModel, prompts: Sequence[str], path: Path, batch_size: int, chat: bool) -> None:
    """Capture one chunk and write it. Prompts run longest first so that batches pad little."""
    tokens = [token_ends(lm.tokenizer, p, chat) for p in prompts]
    for prompt, (ids, _) in zip(prompts, tokens, strict=True):
        if ids != encode(lm.tokenizer, prompt, chat):
            raise ValueError(f"the tokenizer of {lm.name!r} encodes differently with offsets; cannot pair")
    order = sorted(range(len(prompts)), key=lambda i: -len(tokens[i][0]))
    _, layers = capture_all_positions(lm, [prompts[i] for i in order], batch_size, chat, desc=path.name)
    starts = torch.tensor([0] + [len(tokens[i][0]) for i in order]).cumsum(0)  # rows of prompt order[j]
    rank = {prompt_index: j for j, prompt_index in enumerate(order)}
    rows = torch.cat([torch.arange(starts[rank[i]], starts[rank[i] + 1]) for i in range(len(prompts))])
    tensors = {f"layer.{index}": layer[rows].contiguous() for index, layer in enumerate(layers)}
    tensors["ids"] = torch.tensor([t for ids, _ in tokens for t in ids], dtype=torch.int64)
    tensors["ends"] = torch.tensor([e for _, ends in tokens for e in ends], dtype=torch.int64)
    tensors["lengths"] = torch.tensor([len(ids) for ids, _ in tokens], dtype=torch.int64)
    metadata = chunk_metadata(lm.name, lm.num_layers, lm.hidden_size, chat, prompts)
    write_atomic(path, save_safetensors(tensors, metadata))


def chunk_metadata(
    model: str, num_layers: int, hidden_size: int, chat: bool, prompts: Sequence[str]
) -> dict[str, str]:
    """What a chunk records about itself (`Chunk.open` checks its format), wherever it was captured."""
    return {
        "format": STREAMS_TAG,
        "format_version": STREAMS_VERSION,
        "model": model,
        "num_layers": str(num_layers),
        "hidden_size": str(hidden_size),
        "chat_template": str(chat).lower(),
        "prompts": json.dumps(list(prompts), ensure_ascii=False),
    }


def capture_streams(
    lm: LoadedModel, prompts: Sequence[str], root: str | Path, batch_size: int = 8, chat: bool = False
) -> list[Chunk]:
    """Every token's stream of ``lm`` on ``prompts``, chunk by chunk; chunks already in the store are kept."""
    directory = store_dir(root, lm, chat)
    directory.mkdir(parents=True, exist_ok=True)
    chunks, paths = chunk_paths(directory, prompts)
    missing = [(c, p) for c, p in zip(chunks, paths, strict=True) if not p.is_file()]
    for chunk, path in tqdm(missing, desc=f"capture {Path(lm.name).name}", unit="chunk", disable=None):
        write_chunk(lm, chunk, path, batch_size, chat)
    return [Chunk.open(path) for path in paths]


def load_layer(chunks: Sequence[Chunk], index: int) -> torch.Tensor:
    """Layer ``index`` of every chunk, one after the other: [tokens of all prompts, hidden] float16."""
    return torch.cat([chunk.layer(index) for chunk in chunks])
