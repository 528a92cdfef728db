"""A target served by unlock-serve, read through its admin capture endpoint (`/v1/capture`): the rows
`unlock.capture` and `unlock.streams` read from a model folder, without a second copy of the model here.

The server tokenizes each prompt as vLLM does a completion (special tokens added, no chat template) and
answers a safetensors file: ``layer.<l>`` [rows, hidden] (the stream after decoder layer l), ``ids`` and
``ends`` int64 [rows], ``lengths`` int64 [prompts]: the layout of an `unlock capture` chunk. A call is bounded
by the server's limits (prompts, tokens, bytes): prompts go in calls of at most ``max_prompts`` (and, at one
row per prompt, ``max_bytes``); token counts only the server knows, so a call it refuses as too large (413)
is split in two until each part fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm
from unlock_client import UnlockAPIError, UnlockClient

from unlock.artifacts import write_atomic
from unlock.capture import check_finite
from unlock.streams import Chunk, chunk_metadata, chunk_paths, store_dir_of

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
TIMEOUT_S = 600.0  # one call: a batch of prompts through the served model
T = TypeVar("T")


@dataclass(frozen=True)
class CaptureLimits:
    """Most prompts, prompt tokens (summed) and response bytes of one capture call."""

    max_prompts: int
    max_tokens: int
    max_bytes: int


@dataclass(frozen=True)
class ServedTarget:
    """The model an unlock-serve serves, with the facts an artifact records about it (from the server)."""

    url: str  # the server's root, without /v1
    admin_key: str | None = field(repr=False)
    model: str  # the name it is served under
    name: str  # the name an artifact records (`unlock.identity.model_name` of the served folder)
    architecture: str
    num_layers: int
    hidden_size: int
    config_sha256: str
    dtype: str  # the engine's
    offsets: bool  # whether the server's tokenizer gives character offsets (`ends`)
    limits: CaptureLimits

    @classmethod
    def connect(cls, url: str, admin_key: str | None, model: str | None = None) -> ServedTarget:
        """Describe the model served at ``url`` (``model``: one of its served names, checked; default the
        server's); fails on a server that does not answer or a key that is not the admin key."""
        url = url.rstrip("/")
        info = call(url, admin_key, lambda client: client.capture_info())
        if model is not None and model != info["model"]:
            names = call(url, admin_key, lambda client: client.served_models())
            if model not in names:
                raise ValueError(f"unlock-serve at {url} serves {names}, not {model!r}")
        return cls(
            url=url,
            admin_key=admin_key,
            model=model or info["model"],
            name=info["name"],
            architecture=info["architecture"],
            num_layers=int(info["num_layers"]),
            hidden_size=int(info["hidden_size"]),
            config_sha256=info["config_sha256"],
            dtype=info["dtype"],
            offsets=bool(info["offsets"]),
            limits=CaptureLimits(**{k: int(v) for k, v in info["limits"].items()}),
        )

    def capture(
        self,
        prompts: Sequence[str],
        positions: str = "last",
        dtype: str = "float32",
        bar: tqdm | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every layer's rows of ``prompts`` (``layer.<l>``, ``ids``, ``ends``, ``lengths``), in as many calls
        as the server's limits need; ``bar`` advances by the prompts of each call."""
        if not prompts:
            raise ValueError("no prompts to capture")
        row_bytes = self.num_layers * self.hidden_size * ITEMSIZE[dtype]  # one token, every layer
        per_call = max(1, min(self.limits.max_prompts, self.limits.max_bytes // row_bytes))
        starts = range(0, len(prompts), per_call)
        return concat(
            [self._split_call(list(prompts[i : i + per_call]), positions, dtype, bar) for i in starts]
        )

    def _split_call(
        self, prompts: list[str], positions: str, dtype: str, bar: tqdm | None
    ) -> dict[str, torch.Tensor]:
        """One call, or two halves (recursively) if the server finds it too large."""
        try:
            data = call(self.url, self.admin_key, lambda c: c.capture(prompts, None, positions, dtype))
        except TooLarge:
            if len(prompts) == 1:
                raise
            half = len(prompts) // 2
            return concat(
                [self._split_call(p, positions, dtype, bar) for p in (prompts[:half], prompts[half:])]
            )
        tensors = load_safetensors(data)
        problem = answer_problem(tensors, len(prompts), positions, self.num_layers, self.hidden_size)
        if problem:
            raise ValueError(f"unlock-serve at {self.url} answered a capture that does not fit it: {problem}")
        if bar is not None:
            bar.update(len(prompts))
        return tensors

    def capture_last_token(self, prompts: Sequence[str], desc: str | None = None) -> torch.Tensor:
        """Residual stream after every decoder layer at each prompt's last token: float32 [N, layers, hidden]
        (as `unlock.capture.capture_last_token`)."""
        desc = desc or f"capture {self.model}"
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=None) as bar:
            tensors = self.capture(prompts, "last", "float32", bar)
        acts = torch.stack([tensors[f"layer.{layer}"] for layer in range(self.num_layers)], dim=1)
        check_finite(acts, self.name)  # [N, num_layers, hidden]
        return acts

    def store_dir(self, root: str | Path) -> Path:
        """Its all-position store: named by the model's name and config hash, apart from any folder's."""
        identity = f"{self.name}@{self.config_sha256}"
        return store_dir_of(root, identity, f"torch.{self.dtype}", False, self.num_layers, self.hidden_size)

    def capture_streams(self, prompts: Sequence[str], root: str | Path) -> list[Chunk]:
        """Every token's stream on ``prompts``, as `unlock capture` chunks (float16, one call per chunk at
        most); chunks already in the store are kept (as `unlock.streams.capture_streams`)."""
        if not self.offsets:
            raise ValueError(
                f"token-level alignment pairs tokens by character offsets, which the tokenizer served at "
                f"{self.url} does not give: use --align-positions last"
            )
        directory = self.store_dir(root)
        directory.mkdir(parents=True, exist_ok=True)
        chunks, paths = chunk_paths(directory, prompts)
        missing = [(c, p) for c, p in zip(chunks, paths, strict=True) if not p.is_file()]
        for chunk, path in tqdm(missing, desc=f"capture {self.model}", unit="chunk", disable=None):
            tensors = self.capture(chunk, "all", "float16")
            layers = torch.stack([tensors[f"layer.{layer}"] for layer in range(self.num_layers)], dim=1)
            check_finite(layers, self.name, rows_of=tensors["lengths"].tolist())  # [rows, layers, hidden]
            metadata = chunk_metadata(self.name, self.num_layers, self.hidden_size, False, chunk)
            write_atomic(path, save_safetensors(tensors, metadata))
        return [Chunk.open(path) for path in paths]


def concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The answers of consecutive calls as one: every tensor's rows (or lengths) one after the other."""
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def answer_problem(
    tensors: dict[str, torch.Tensor], n: int, positions: str, num_layers: int, hidden_size: int
) -> str | None:
    """What is wrong with an answer for ``n`` prompts, if anything: its tensors, lengths or shapes."""
    keys = {f"layer.{layer}" for layer in range(num_layers)} | {"ids", "ends", "lengths"}
    if set(tensors) != keys:
        return f"tensors {sorted(set(tensors) ^ keys)} missing or unexpected"
    lengths = tensors["lengths"]
    if lengths.shape != (n,) or (positions == "last" and bool((lengths != 1).any())):
        return f"lengths {lengths.tolist()} for {n} prompts at {positions!r} positions"
    rows = int(lengths.sum())
    for key, tensor in tensors.items():
        expected = (rows, hidden_size) if key.startswith("layer.") else (n,) if key == "lengths" else (rows,)
        if tuple(tensor.shape) != expected:
            return f"{key} has shape {tuple(tensor.shape)}, expected {expected}"
    return None


class TooLarge(ValueError):
    """The server refused a call as past its limits (413)."""


HINTS = {
    401: " (give the server's admin key: --admin-key or UNLOCK_ADMIN_KEY)",
    403: " (give the server's admin key: --admin-key or UNLOCK_ADMIN_KEY)",
    404: " (is it an unlock-serve with the capture endpoint?)",
}


def call(url: str, admin_key: str | None, request: Callable[[UnlockClient], T]) -> T:
    """``request(client)`` against the server at ``url``, its failures as ValueErrors that say what to do."""
    try:
        with UnlockClient(url, api_key=admin_key, timeout=TIMEOUT_S) as client:
            return request(client)
    except UnlockAPIError as err:
        kind = TooLarge if err.status == 413 else ValueError
        raise kind(f"unlock-serve at {url}: {err}{HINTS.get(err.status, '')}") from None
    except httpx.HTTPError as err:
        raise ValueError(f"cannot reach unlock-serve at {url}: {err or type(err).__name__}") from None
