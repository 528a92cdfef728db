"""The worker-side capability registry: capabilities by sha256, each in one row of the capability table.

Registration validates with the same validator the CLI and the server use (`Capability.validate`, with the
server's strength limit and this model's dtype) and writes the capability's table rows once; requests then
refer to it by its row. Unregistering is deferred for requests that already use a capability: the entry is
retired (new requests can no longer pick it) but keeps its row until the last request that selected it
finishes, so a request that is preempted and resumed recomposes the same terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from unlock.ops import Term, operator
from unlock.validation import DEFAULT_MAX_STRENGTH
from unlock_vllm.request import WireSelection
from unlock_vllm.tables import CapabilityTable


class RegistryFull(ValueError):
    pass


@dataclass
class LoadedCapability:
    sha256: str
    name: str
    mode: str
    layers: list[int]
    slot: int  # row in the capability table
    users: set[str] = field(default_factory=set)  # request ids that selected this entry and are alive
    retired: bool = False


class WorkerRegistry:
    def __init__(
        self,
        capacity: int,
        num_layers: int,
        hidden_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layer_ids: list[int] | None = None,
        max_strength: float = DEFAULT_MAX_STRENGTH,
    ) -> None:
        """`layer_ids`: the decoder layers this worker holds (all by default; pipeline ranks hold some).
        `max_strength`: the server's strength limit, which the validator applies to registrations."""
        self.capacity = capacity
        self.max_strength = max_strength
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.dtype = dtype
        layer_ids = list(range(num_layers)) if layer_ids is None else layer_ids
        self.table = CapabilityTable(layer_ids, capacity, hidden_size, dtype, torch.device(device))
        self.entries: dict[str, LoadedCapability] = {}
        self.free_slots = list(range(capacity, 0, -1))

    def register(self, path: str, sha256: str) -> dict[str, Any]:
        """Load, validate and store one artifact; ArtifactError (invalid), RegistryFull or ValueError."""
        from unlock import Capability, Limits

        existing = self.entries.get(sha256)
        if existing is not None:
            existing.retired = False
            return self._describe(existing)
        if not self.free_slots:
            raise RegistryFull(
                f"capability registry full ({self.capacity} entries): unregister one, or raise "
                f"additional_config['unlock']['max_capabilities']"
            )
        cap = Capability.load(path)
        if cap.sha256 != sha256:
            raise ValueError(f"sha256 mismatch for {path}: expected {sha256}, file has {cap.sha256}")
        cap.validate(self.num_layers, self.hidden_size, Limits(self.max_strength, self.dtype))
        entry = LoadedCapability(
            sha256, cap.name, cap.mode, [int(i) for i in cap.layers], self.free_slots.pop()
        )
        self.table.write(entry.slot, entry.layers, cap.table_rows())
        self.entries[sha256] = entry
        return self._describe(entry)

    def unregister(self, sha256: str) -> dict[str, Any]:
        entry = self.entries.get(sha256)
        if entry is None:
            return {"ok": False, "error": f"capability {sha256} is not registered on this worker"}
        entry.retired = True
        if not entry.users:
            self._drop(entry)
        return {"ok": True, "error": None, "deferred_for_requests": len(entry.users)}

    def terms(self, selection: WireSelection, req_id: str) -> list[Term]:
        """The steering terms of one request; KeyError when a capability is unknown (or retired for it),
        ValueError when the request names another mode than the capability's."""
        terms = []
        for sha256, strength, mode, positions in selection:
            entry = self.entries.get(sha256)
            if entry is None or (entry.retired and req_id not in entry.users):
                raise KeyError(f"capability {sha256} is not registered on this worker")
            if mode != entry.mode:
                raise ValueError(f"capability {sha256[:12]} is {entry.mode}, the request says {mode}")
            terms.append(Term(entry.slot, strength, operator(mode).code, positions))
        for sha256, *_ in selection:
            self.entries[sha256].users.add(req_id)
        return terms

    def release(self, req_id: str) -> None:
        """A request finished: drop it from its entries and free entries retired meanwhile."""
        for entry in [e for e in self.entries.values() if req_id in e.users]:
            entry.users.discard(req_id)
            if entry.retired and not entry.users:
                self._drop(entry)

    def _drop(self, entry: LoadedCapability) -> None:
        del self.entries[entry.sha256]
        self.table.clear(entry.slot)
        self.free_slots.append(entry.slot)

    def active(self) -> list[str]:
        return sorted(sha for sha, e in self.entries.items() if not e.retired)

    @staticmethod
    def _describe(entry: LoadedCapability) -> dict[str, Any]:
        return {
            "ok": True,
            "error": None,
            "sha256": entry.sha256,
            "name": entry.name,
            "mode": entry.mode,
            "layers": entry.layers,
        }
