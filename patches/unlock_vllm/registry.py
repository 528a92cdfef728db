"""The worker-side capability registry: target directions by sha256, validated against the loaded model.

Unregistering is deferred for requests that already use a capability: the entry is retired (new requests
can no longer pick it) but kept until the last request that composed it finishes, so a request that is
preempted and resumed recomposes the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from unlock.ops import SteeringTerm


@dataclass
class Entry:
    sha256: str
    name: str
    mode: str
    layers: list[int]
    directions: torch.Tensor  # float32 [len(layers), hidden], on CPU: the precision rows are composed in
    users: set[str] = field(default_factory=set)  # request ids that composed this entry and are alive
    retired: bool = False


class Registry:
    def __init__(self, capacity: int, num_layers: int, hidden_size: int) -> None:
        self.capacity = capacity
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.entries: dict[str, Entry] = {}

    def register(self, path: str, sha256: str) -> dict[str, Any]:
        """Load, verify and store one artifact; raises ValueError naming what is wrong."""
        from unlock import Capability

        existing = self.entries.get(sha256)
        if existing is not None:
            existing.retired = False
            return self._describe(existing)
        if len(self.entries) >= self.capacity:
            raise ValueError(
                f"capability registry full ({self.capacity} entries): unregister one, or raise "
                f"additional_config['unlock']['max_capabilities']"
            )
        cap = Capability.load(path)
        if cap.sha256 != sha256:
            raise ValueError(f"sha256 mismatch for {path}: expected {sha256}, file has {cap.sha256}")
        cap.check_target(self.num_layers, self.hidden_size)
        directions = cap.target_directions().detach().to("cpu", torch.float32)
        layers = [int(layer) for layer in cap.layers]
        if directions.shape != (len(layers), self.hidden_size):
            raise ValueError(
                f"directions of {cap.name!r} have shape {tuple(directions.shape)}, "
                f"expected ({len(layers)}, {self.hidden_size})"
            )
        if not torch.isfinite(directions).all():
            raise ValueError(f"directions of {cap.name!r} contain non-finite values")
        if any(not 0 <= layer < self.num_layers for layer in layers):
            raise ValueError(
                f"layers {layers} of {cap.name!r} fall outside the model's {self.num_layers} layers"
            )
        if (directions.norm(dim=-1) == 0).any():
            raise ValueError(f"a direction of {cap.name!r} is zero; rotate mode cannot normalise it")
        entry = Entry(sha256, cap.name, cap.mode, layers, directions)
        self.entries[sha256] = entry
        return self._describe(entry)

    def unregister(self, sha256: str) -> dict[str, Any]:
        entry = self.entries.get(sha256)
        if entry is None:
            return {"ok": False, "error": f"capability {sha256} is not registered on this worker"}
        entry.retired = True
        if not entry.users:
            del self.entries[sha256]
        return {"ok": True, "error": None, "deferred_for_requests": len(entry.users)}

    def terms(self, selection: list[tuple[str, float, str]], req_id: str) -> list[SteeringTerm]:
        """The steering terms of one request; KeyError when a capability is unknown (or retired for it)."""
        terms = []
        for sha256, strength, mode in selection:
            entry = self.entries.get(sha256)
            if entry is None or (entry.retired and req_id not in entry.users):
                raise KeyError(f"capability {sha256} is not registered on this worker")
            terms.append(SteeringTerm(mode, strength, entry.layers, entry.directions))
        for sha256, _, _ in selection:
            self.entries[sha256].users.add(req_id)
        return terms

    def release(self, req_id: str) -> None:
        """A request finished: drop it from its entries and free entries retired meanwhile."""
        for sha256 in [sha for sha, e in self.entries.items() if req_id in e.users]:
            entry = self.entries[sha256]
            entry.users.discard(req_id)
            if entry.retired and not entry.users:
                del self.entries[sha256]

    def active(self) -> list[str]:
        return sorted(sha for sha, e in self.entries.items() if not e.retired)

    @staticmethod
    def _describe(entry: Entry) -> dict[str, Any]:
        return {
            "ok": True,
            "error": None,
            "sha256": entry.sha256,
            "name": entry.name,
            "mode": entry.mode,
            "layers": entry.layers,
        }
