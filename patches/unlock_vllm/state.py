"""Per-runner steering state: fixed-address tables and index buffers, request slots, the per-step write.

Tensors (allocated once at model load, on the model's device, never reallocated):
- add_table, rot_table: [num_layers, max_num_reqs + 1, hidden] in the model dtype; row 0 is zero (off).
  Row k of layer l holds the composed steering of the request that owns slot k.
- add_index, rot_index: int64 [max tokens per forward]; the table row for each flat token of the step.
  ``add`` points every token of a steered request at its slot; ``rotate`` only its last prompt token.
The forward hooks read only these tensors, so eager, torch.compile and CUDA-graph replay all see the
values written in place here before each forward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from unlock.ops import compose_rows
from unlock_vllm.registry import Registry
from unlock_vllm.request import EXTRA_ARGS_KEY, decode_selection
from unlock_vllm.staging import Staging
from unlock_vllm.steer_op import steer

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's configured "vllm" logger


def _make_hook(
    add_table: torch.Tensor,
    rot_table: torch.Tensor,
    rot_map: torch.Tensor,
    add_index: torch.Tensor,
    rot_index: torch.Tensor,
):
    """A forward hook for one decoder layer; tensors only, so compiled graphs read the live values.

    `rot_map` [rows] maps a slot to itself where its rotate row at this layer is non-zero, else to 0:
    rotating by a zero row would be the identity only up to rounding, so such layers are skipped exactly.
    """

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        layer_rot_index = rot_map[rot_index[: hidden.shape[0]]]  # [T]
        if isinstance(output, tuple):  # (hidden, residual, ...): the stream is hidden + residual
            hidden = steer(hidden, output[1], add_table, rot_table, add_index, layer_rot_index)
            return (hidden, *output[1:])
        return steer(hidden, None, add_table, rot_table, add_index, layer_rot_index)

    return hook


class SteeringState:
    def __init__(
        self,
        layers: list[tuple[int, nn.Module]],
        num_layers: int,
        hidden_size: int,
        max_num_reqs: int,
        max_num_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        registry: Registry,
        runner_class: str,
        compilation_mode: str,
    ) -> None:
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.registry = registry
        self.runner_class = runner_class
        self.compilation_mode = compilation_mode
        rows = max_num_reqs + 1
        self.add_table = torch.zeros(num_layers, rows, hidden_size, dtype=dtype, device=device)
        self.rot_table = torch.zeros(num_layers, rows, hidden_size, dtype=dtype, device=device)
        self.rot_map = torch.zeros(num_layers, rows, dtype=torch.int64, device=device)  # see _make_hook
        self.add_index = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        self.rot_index = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        self._staging = Staging(self.add_index, self.rot_index)
        self._dirty = False  # the buffers hold a non-zero index from an earlier step
        self.slot_of: dict[str, int] = {}  # request id -> slot (0: runs unsteered)
        self.free_slots = list(range(rows - 1, 0, -1))
        self.has_add = np.zeros(rows, dtype=bool)
        self.has_rot = np.zeros(rows, dtype=bool)
        self.handles = [
            layer.register_forward_hook(
                _make_hook(
                    self.add_table[i], self.rot_table[i], self.rot_map[i], self.add_index, self.rot_index
                )
            )
            for i, layer in layers
        ]
        self.wrapped_layers = len(self.handles)
        self.steered_tokens = 0  # tokens that got a non-zero row: proof that steering ran
        self.preempted_slots = 0  # slots freed by preemption (the request recomposes on resume)

    def remove(self) -> None:
        """Take the hooks off the model (reversible install)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.wrapped_layers = 0

    # -- request lifecycle -------------------------------------------------------------------------

    def free(self, req_ids: Iterable[str], finished: bool) -> None:
        """Release the slots of requests that finished or were preempted (a resumed one recomposes)."""
        for req_id in req_ids:
            if self._release_slot(req_id):
                self.preempted_slots += not finished
            if finished:
                self.registry.release(req_id)

    def admit(self, req_id: str, sampling_params: Any) -> None:
        """Give a request entering the batch its slot: its rows composed once (slot 0: runs unsteered)."""
        self._release_slot(req_id)  # a request re-added with new input (streaming) starts over
        self.slot_of[req_id] = self._compose(req_id, sampling_params)

    def _staged(self, rows: torch.Tensor) -> torch.Tensor:
        """Host rows ready for a non-blocking upload: pinned on GPUs (a pageable copy would sync the
        stream at each admission). The caching host allocator keeps the pinned block until the copy ran."""
        return rows if self.add_table.device.type == "cpu" else rows.pin_memory()

    def _release_slot(self, req_id: str) -> bool:
        slot = self.slot_of.pop(req_id, 0)
        if not slot:
            return False
        self.add_table[:, slot].zero_()
        self.rot_table[:, slot].zero_()
        self.rot_map[:, slot] = 0
        self.has_add[slot] = self.has_rot[slot] = False
        self.free_slots.append(slot)
        return True

    def _compose(self, req_id: str, sampling_params: Any) -> int:
        """Compose a request's rows into a free slot; 0 (unsteered) if it selects nothing or is bad."""
        extra = getattr(sampling_params, "extra_args", None) or {}
        text = extra.get(EXTRA_ARGS_KEY)
        if text is None:
            return 0
        try:
            selection = decode_selection(text)
            if not selection:
                return 0
            if not self.free_slots:
                raise RuntimeError("no free steering slot (more running requests than max_num_seqs)")
            terms = self.registry.terms(selection, req_id)
            add_rows, rot_rows = compose_rows(terms, self.num_layers, self.hidden_size)  # [L, d] each
        except (ValueError, KeyError, RuntimeError) as exc:
            logger.error("unlock: request %s runs unsteered: %s", req_id, exc)
            return 0
        slot = self.free_slots.pop()
        rot_map = rot_rows.ne(0).any(-1).to(torch.int64) * slot  # [L]
        self.add_table[:, slot].copy_(self._staged(add_rows), non_blocking=True)
        self.rot_table[:, slot].copy_(self._staged(rot_rows), non_blocking=True)
        self.rot_map[:, slot].copy_(self._staged(rot_map), non_blocking=True)
        self.has_add[slot] = any(t.mode == "add" for t in terms)
        self.has_rot[slot] = any(t.mode == "rotate" for t in terms)
        return slot

    # -- per step ----------------------------------------------------------------------------------

    def write_step(
        self,
        req_ids: list[str],
        num_scheduled: np.ndarray,
        num_computed: np.ndarray,
        num_prompt: np.ndarray,
    ) -> None:
        """Write this step's per-token indices in place (tail zeroed), batch order = `req_ids`, every one
        of them admitted.

        num_scheduled, num_computed, num_prompt: per request of the batch (N, C, P). The last prompt
        token is in this step when C <= P-1 < C+N; its flat index is Q + P-1-C (Q = query start).
        """
        slots = np.fromiter((self.slot_of[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        if not slots.any() and not self._dirty:
            return  # the buffers are all zero already: nothing to write
        num_tokens = int(num_scheduled.sum())
        starts = np.cumsum(num_scheduled) - num_scheduled  # Q per request
        add = np.repeat(np.where(self.has_add[slots], slots, 0), num_scheduled)  # [T]
        last = num_prompt - 1 - num_computed
        hit = self.has_rot[slots] & (last >= 0) & (last < num_scheduled)
        add_host, rot_host = self._staging.host()
        add_host[:num_tokens] = add
        add_host[num_tokens:] = 0
        rot_host[:] = 0
        rot_host[(starts + last)[hit]] = slots[hit]
        self.steered_tokens += int(np.count_nonzero(add)) + int(hit.sum())
        self._dirty = bool(slots.any())
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
            "slots_in_use": sum(1 for s in self.slot_of.values() if s),
            "steered_tokens": self.steered_tokens,
            "preempted_slots": self.preempted_slots,
        }
