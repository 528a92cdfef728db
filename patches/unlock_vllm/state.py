"""Per-runner steering state: the forward hooks, request admission, and the per-step write.

Tensors (`tables`): the capability table (registered capabilities x layers held x hidden, model dtype), the
term rows (small, shared by equal selections) and ``token_row``: int64 [max tokens per forward], the term
row of each flat token of the step (tail zero). A request is admitted by looking its capabilities up and
taking one term row per token class (prompt, last prompt token, generated; `unlock.ops`): no tensor math
and no device copy. Each step writes ``token_row`` from the batch layout and uploads it, with the term rows
admissions changed, without a host sync (`Staging`). The forward hooks read only these tensors, so eager,
torch.compile and CUDA-graph replay all see the values written in place before each forward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from unlock.ops import TOKEN_CLASSES, class_terms
from unlock_vllm.capture import Recorder
from unlock_vllm.registry import WorkerRegistry
from unlock_vllm.request import EXTRA_ARGS_KEY, MAX_SELECTED, decode_selection
from unlock_vllm.staging import Staging
from unlock_vllm.steer_op import steer
from unlock_vllm.tables import TermRows

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's configured "vllm" logger

STATE_ATTR = "unlock_state"  # the model runner's attribute holding its SteeringState
UNSTEERED = (0,) * len(TOKEN_CLASSES)


def _make_hook(layer: int, dirs: torch.Tensor, gate: torch.Tensor, terms: TermRows, token_row: torch.Tensor):
    """A forward hook for decoder layer `layer`; tensors only, so compiled graphs read the live values."""
    tables = (dirs, gate, terms.cap, terms.strength, terms.op, token_row)

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # (hidden, residual, ...): the stream is hidden + residual
            return (steer(output[0], output[1], *tables, layer), *output[1:])
        return steer(output, None, *tables, layer)

    return hook


def table_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class SteeringState:
    def __init__(
        self,
        layers: list[tuple[int, nn.Module]],
        max_num_reqs: int,
        max_num_tokens: int,
        registry: WorkerRegistry,
        runner_class: str,
        compilation_mode: str,
        records_captures: bool = True,
    ) -> None:
        self.registry = registry
        self.num_layers, self.hidden_size = registry.num_layers, registry.hidden_size
        self.runner_class = runner_class
        self.compilation_mode = compilation_mode
        table = registry.table
        device = table.dirs.device
        # Each live request holds at most one row per token class: 3 per request, row 0 shared "no terms".
        self.terms = TermRows(1 + len(TOKEN_CLASSES) * max_num_reqs, MAX_SELECTED, device)
        self.token_row = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        self._staging = Staging(self.token_row, (self.terms.cap, self.terms.strength, self.terms.op))
        self._dirty = False  # the buffer holds a non-zero row from an earlier step
        self.rows_of: dict[str, tuple[int, ...]] = {}  # request id -> term row per token class
        self.handles = [
            layer.register_forward_hook(
                _make_hook(
                    i, table.dirs[table.index[i]], table.gate[table.index[i]], self.terms, self.token_row
                )
            )
            for i, layer in layers
        ]
        self.capture = Recorder([i for i, _ in layers], records_captures)
        self.wrapped_layers = len(self.handles)
        self.steered_tokens = 0  # tokens that got a non-zero row: proof that steering ran
        self.preempted_requests = 0  # steered requests freed by preemption (they recompose on resume)

    def remove(self) -> None:
        """Take the hooks off the model (reversible install)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.wrapped_layers = 0

    def table_bytes(self) -> dict[str, int]:
        """Bytes of the steering tensors on the device, by what they scale with."""
        table = self.registry.table
        return {
            "capability_table": table_bytes([table.dirs, table.gate]),
            "term_rows": table_bytes([self.terms.cap, self.terms.strength, self.terms.op]),
            "token_row": table_bytes([self.token_row]),
        }

    # -- request lifecycle -------------------------------------------------------------------------

    def free(self, req_ids: Iterable[str], finished: bool) -> None:
        """Release the rows of requests that finished or were preempted (a resumed one recomposes)."""
        for req_id in req_ids:
            self.capture.release(req_id)
            if self._release(req_id):
                self.preempted_requests += not finished
            if finished:
                self.registry.release(req_id)

    def admit(self, req_id: str, sampling_params: Any) -> None:
        """Give a request entering the batch its term rows (all 0: runs unsteered)."""
        self._release(req_id)  # a request re-added with new input (streaming) starts over
        self.rows_of[req_id] = self._compose(req_id, sampling_params)
        self.capture.admit(req_id, sampling_params)

    def _release(self, req_id: str) -> bool:
        rows = self.rows_of.pop(req_id, UNSTEERED)
        for row in rows:
            self.terms.release(row)
        return rows != UNSTEERED

    def _compose(self, req_id: str, sampling_params: Any) -> tuple[int, ...]:
        """Look a request's capabilities up and take its term rows; unsteered if it selects nothing or is
        malformed (the API server refuses such requests earlier; this keeps the engine alive)."""
        extra = getattr(sampling_params, "extra_args", None) or {}
        text = extra.get(EXTRA_ARGS_KEY)
        if text is None:
            return UNSTEERED
        taken: list[int] = []
        try:
            selection = decode_selection(text)
            if not selection:
                return UNSTEERED
            for key in class_terms(self.registry.terms(selection, req_id)):
                taken.append(self.terms.acquire(key))
        except (ValueError, KeyError, RuntimeError) as exc:
            for row in taken:
                self.terms.release(row)
            logger.error("unlock: request %s runs unsteered: %s", req_id, exc)
            return UNSTEERED
        return tuple(taken)

    # -- per step ----------------------------------------------------------------------------------

    def write_step(
        self,
        req_ids: list[str],
        num_scheduled: np.ndarray,
        num_computed: np.ndarray,
        num_prompt: np.ndarray,
    ) -> None:
        """Write this step's per-token rows in place (tail zeroed), batch order = `req_ids`, every one of
        them admitted.

        num_scheduled, num_computed, num_prompt: per request of the batch (N, C, P). The step holds
        positions C..C+N-1 of each request: those below P-1 are prompt tokens, P-1 is the last prompt token
        (also under chunked prefill and after a prefix-cache hit), the rest are generated tokens.
        """
        self.capture.plan(req_ids, num_scheduled, num_computed, num_prompt)
        rows = np.array([self.rows_of[r] for r in req_ids], dtype=np.int64).reshape(-1, len(UNSTEERED))
        changed = sorted(self.terms.dirty)
        if not rows.any() and not self._dirty and not changed:
            return  # the buffer is all zero already: nothing to write
        self.terms.dirty.clear()
        num_tokens = int(num_scheduled.sum())
        prompt = np.clip(num_prompt - 1 - num_computed, 0, num_scheduled)  # tokens before P-1
        last = ((num_computed <= num_prompt - 1) & (num_prompt - 1 < num_computed + num_scheduled)).astype(
            np.int64
        )
        generated = num_scheduled - prompt - last
        counts = np.stack([prompt, last, generated], axis=1).ravel()  # [3n], in TOKEN_CLASSES order
        token_row = np.repeat(rows.ravel(), counts)  # [T]
        host = self._staging.host()
        host[:num_tokens] = token_row
        host[num_tokens:] = 0
        self._staging.stage_rows(changed, (self.terms.host_cap, self.terms.host_strength, self.terms.host_op))
        self.steered_tokens += int(np.count_nonzero(token_row))
        self._dirty = bool(rows.any())
        self._staging.upload()

    def status(self) -> dict[str, Any]:
        return {
            "wrapped_layers": self.wrapped_layers,
            "runner": self.runner_class,
            "compilation_mode": self.compilation_mode,
            "registered": self.registry.active(),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "capacity": self.registry.capacity,
            "steered_requests": sum(1 for rows in self.rows_of.values() if rows != UNSTEERED),
            "term_rows_in_use": self.terms.in_use(),
            "steered_tokens": self.steered_tokens,
            "preempted_requests": self.preempted_requests,
            "capture_requests": len(self.capture.requests),
            "capture_held_bytes": self.capture.held_bytes,
            "table_bytes": self.table_bytes(),
        }
