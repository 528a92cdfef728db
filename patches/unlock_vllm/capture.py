"""Capture mode: the residual stream after chosen decoder layers, for the requests that ask for it.

A capture request carries ``extra_args["unlock_capture"]``, a JSON object {"id", "index", "layers",
"positions"} (`capture_args`): the call it belongs to, its prompt's place in that call, the global layer
indices to read, and "last" (the last prompt token) or "all" (every prompt token). The API server sends such
requests unsteered, with one token to generate and a cache salt of their own, so every prompt token is
computed here (no prefix-cache hit skips one).

Per step, `plan` finds the flat token rows of capture requests from the batch layout (the same numbers the
steering write uses); the steering op, which every hooked layer already calls, hands its input to `record`.
That is Python running inside the op, so it runs eagerly and under torch.compile (the op is opaque), but not
in a CUDA-graph replay: the runners run a step that holds a capture request without graphs (`live`).
Rows stay in this worker, float32 on the host, until `take` returns them as safetensors bytes. Only the first
tensor-parallel rank of a stage records: the stream is replicated across TP ranks, so rows are gathered once.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's configured "vllm" logger

CAPTURE_KEY = "unlock_capture"
CAPTURE_POSITIONS = ("last", "all")
# Rows one worker holds for calls not yet taken; past it a call fails (the API bounds a call far below).
MAX_HELD_BYTES = 4 << 30


def capture_args(capture_id: str, index: int, layers: list[int], positions: str) -> str:
    """The ``extra_args["unlock_capture"]`` value of one prompt of a capture call."""
    return json.dumps({"id": capture_id, "index": index, "layers": layers, "positions": positions})


@dataclass(frozen=True)
class CaptureRequest:
    capture_id: str
    index: int  # the prompt's place in its call
    layers: frozenset[int]
    positions: str

    @classmethod
    def parse(cls, text: Any) -> CaptureRequest:
        raw = json.loads(text)
        layers = raw["layers"]
        if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
            raise ValueError(f"capture layers must be a list of ints, got {layers!r:.80}")
        if raw["positions"] not in CAPTURE_POSITIONS:
            raise ValueError(f"capture positions must be one of {CAPTURE_POSITIONS}")
        return cls(str(raw["id"]), int(raw["index"]), frozenset(layers), raw["positions"])


@dataclass
class Held:
    """What one call's prompts recorded so far: per prompt and layer, (positions, rows) pieces."""

    pieces: dict[int, dict[int, list[tuple[np.ndarray, torch.Tensor]]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    error: str | None = None


class Recorder:
    def __init__(self, layer_ids: list[int], records: bool):
        self.layer_ids = frozenset(layer_ids)  # the layers this worker holds (a pipeline stage's)
        self.records = records
        self.requests: dict[str, CaptureRequest] = {}  # in the batch now, by request id
        self.step: list[tuple[CaptureRequest, int, int, int]] = []  # (request, first row, end row, position)
        self.held: dict[str, Held] = defaultdict(Held)
        self.held_bytes = 0

    @property
    def live(self) -> bool:
        """Whether a capture request is in the batch: its steps must run the op's Python (no graph replay)."""
        return bool(self.requests)

    def admit(self, req_id: str, sampling_params: Any) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        text = extra.get(CAPTURE_KEY)
        if text is None:
            return
        try:
            self.requests[req_id] = CaptureRequest.parse(text)
        except (ValueError, KeyError, TypeError) as exc:  # the API server sends well-formed ones
            logger.error("unlock: request %s captures nothing: malformed %s (%s)", req_id, CAPTURE_KEY, exc)

    def release(self, req_id: str) -> None:
        """The request left the batch (finished or preempted); what it recorded stays until taken."""
        self.requests.pop(req_id, None)

    def plan(
        self, req_ids: list[str], num_scheduled: np.ndarray, num_computed: np.ndarray, num_prompt: np.ndarray
    ) -> None:
        """This step's rows to record: each capture request's prompt tokens among its scheduled ones (its last
        prompt token only, for "last"). Batch order = `req_ids`, as in `SteeringState.write_step`."""
        self.step = []
        if not self.requests or not self.records:
            return
        starts = np.concatenate([[0], np.cumsum(num_scheduled)[:-1]])
        for b, req_id in enumerate(req_ids):
            request = self.requests.get(req_id)
            if request is None:
                continue
            first, end = int(num_computed[b]), int(min(num_computed[b] + num_scheduled[b], num_prompt[b]))
            if request.positions == "last":
                first = max(first, int(num_prompt[b]) - 1)
            if first < end:
                row = int(starts[b]) + first - int(num_computed[b])
                self.step.append((request, row, row + end - first, first))

    def record(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Keep this step's capture rows of decoder layer `layer`'s output stream (hidden + residual, in the
        model dtype, as the next layer reads it)."""
        for request, lo, hi, position in self.step:
            if layer not in request.layers:
                continue
            held = self.held[request.capture_id]
            if held.error is not None:
                continue
            rows = hidden[lo:hi] if residual is None else hidden[lo:hi] + residual[lo:hi]
            rows = rows.float().cpu()
            if self.held_bytes + rows.numel() * 4 > MAX_HELD_BYTES:
                held.error = f"this worker holds over {MAX_HELD_BYTES} bytes of uncollected capture rows"
                continue
            self.held_bytes += rows.numel() * 4
            positions = np.arange(position, position + hi - lo, dtype=np.int64)
            held.pieces[request.index][layer].append((positions, rows))

    def take(self, capture_id: str) -> bytes:
        """One call's rows, forgotten here: safetensors with ``<index>.layer.<l>`` float32 [rows, hidden] and
        ``<index>.positions`` int64 [rows], each prompt's positions ascending, each position once (a
        preempted request recomputes some). Empty when this worker recorded nothing for the call."""
        held = self.held.pop(capture_id, None)
        if held is None:
            return b""
        tensors: dict[str, torch.Tensor] = {}
        for index, layers in held.pieces.items():
            for layer, pieces in layers.items():
                self.held_bytes -= sum(rows.numel() * 4 for _, rows in pieces)
                positions = np.concatenate([p for p, _ in pieces])
                kept, first = np.unique(positions, return_index=True)  # sorted, first occurrence of each
                tensors[f"{index}.layer.{layer}"] = torch.cat([r for _, r in pieces])[torch.from_numpy(first)]
                tensors[f"{index}.positions"] = torch.from_numpy(kept)
        if held.error is not None:
            raise RuntimeError(held.error)
        return save_safetensors(tensors) if tensors else b""


ACTIVE: Recorder | None = None  # this worker process's recorder (one model runner per process)


def record(layer: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
    """Called by the steering op on every hooked layer: cheap when no capture request runs."""
    recorder = ACTIVE
    if recorder is not None and recorder.step:
        recorder.record(layer, hidden, residual)


def live() -> bool:
    return ACTIVE is not None and ACTIVE.live
