"""The fixed-address tables the steering op reads (layout and meaning: `unlock.ops`).

- `CapabilityTable`: ``dirs`` [layers held, max_capabilities + 1, hidden] in the model dtype and ``gate``
  [layers held, max_capabilities + 1] float32. Row c is registered capability c's table row at each layer
  (row 0 zero); written at registration, never at admission. Its size does not depend on max_num_seqs.
- `TermRows`: ``term_cap``, ``term_strength``, ``term_op`` [1 + 3 * max_num_seqs, MAX_SELECTED]: the
  (capability, strength, operator) terms of each term row. A request uses one row per token class
  (`unlock.ops.class_terms`); requests with equal terms share rows (reference counted). Admission edits only
  the host mirror; `Staging` uploads the changed rows with the step's indices.
Tensors are allocated once, before torch.compile warm-up and CUDA-graph capture, and written in place.
"""

from __future__ import annotations

import numpy as np
import torch

TermKey = tuple[tuple[int, float, int], ...]  # ((cap, strength, op code), ...), () = no terms


class CapabilityTable:
    def __init__(
        self, layer_ids: list[int], capacity: int, hidden_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.index = {layer: i for i, layer in enumerate(layer_ids)}  # global layer -> table index
        self.dirs = torch.zeros(len(layer_ids), capacity + 1, hidden_size, dtype=dtype, device=device)
        self.gate = torch.zeros(len(layer_ids), capacity + 1, dtype=torch.float32, device=device)

    def write(self, slot: int, layers: list[int], rows: torch.Tensor) -> None:
        """Capability `slot`'s table rows (float32 [len(layers), d]) at the layers this worker holds."""
        self.clear(slot)
        held = [(self.index[layer], i) for i, layer in enumerate(layers) if layer in self.index]
        if not held:
            return
        at = torch.tensor([t for t, _ in held], device=self.dirs.device)
        self.dirs[at, slot] = rows[[i for _, i in held]].to(self.dirs.device, self.dirs.dtype)
        self.gate[at, slot] = 1.0

    def clear(self, slot: int) -> None:
        self.dirs[:, slot].zero_()
        self.gate[:, slot].zero_()


class TermRows:
    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self.width = width
        # Host mirrors, written at admission; on CPU the device tensors are views of them.
        self.host_cap = np.zeros((rows, width), dtype=np.int64)
        self.host_strength = np.zeros((rows, width), dtype=np.float32)
        self.host_op = np.zeros((rows, width), dtype=np.int64)
        if device.type == "cpu":
            self.cap = torch.from_numpy(self.host_cap)
            self.strength = torch.from_numpy(self.host_strength)
            self.op = torch.from_numpy(self.host_op)
        else:
            self.cap = torch.zeros(rows, width, dtype=torch.int64, device=device)
            self.strength = torch.zeros(rows, width, dtype=torch.float32, device=device)
            self.op = torch.zeros(rows, width, dtype=torch.int64, device=device)
        self.row_of: dict[TermKey, int] = {(): 0}
        self.key_of: dict[int, TermKey] = {0: ()}
        self.refs = np.zeros(rows, dtype=np.int64)
        self.free = list(range(rows - 1, 0, -1))
        self.dirty: set[int] = set()  # rows changed on the host since the last upload

    def acquire(self, key: TermKey) -> int:
        """The row holding `key` (shared when another request has the same terms); 0 for no terms."""
        if not key:
            return 0
        if len(key) > self.width:
            raise ValueError(f"{len(key)} terms; a term row holds at most {self.width}")
        row = self.row_of.get(key)
        if row is None:
            if not self.free:
                raise RuntimeError("no free term row (more live selections than the table holds)")
            row = self.free.pop()
            self.row_of[key], self.key_of[row] = row, key
            self.host_cap[row] = self.host_strength[row] = self.host_op[row] = 0
            for j, (cap, strength, op) in enumerate(key):
                self.host_cap[row, j], self.host_strength[row, j], self.host_op[row, j] = cap, strength, op
            self.dirty.add(row)
        self.refs[row] += 1
        return row

    def release(self, row: int) -> None:
        if row == 0:
            return
        self.refs[row] -= 1
        if self.refs[row] == 0:
            del self.row_of[self.key_of.pop(row)]
            self.free.append(row)  # its contents stay until reused: no token points at it any more

    def in_use(self) -> int:
        return len(self.key_of) - 1
