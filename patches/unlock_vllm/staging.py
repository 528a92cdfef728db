"""Host-to-device staging of a step's steering data: the per-token term rows and the term rows admissions
changed (torch and numpy only, so the GPU check loads it by path on a machine without vLLM)."""

from __future__ import annotations

import numpy as np
import torch


class Staging:
    """Where the host writes a step's data before it reaches the device tensors.

    On CPU the device tensors themselves (the term tables are views of their host mirrors). On GPUs, pinned
    host copies uploaded with non-blocking copies (no sync in the step, none at admission), a few in
    rotation: with asynchronous scheduling the host lays out step n+1 while step n's copy may still wait in
    the stream, so a copy is reused only after its event fired. Changed term rows travel as (row ids,
    contents) and are scattered on the device with `index_copy_`, stream-ordered before the forward.
    """

    def __init__(
        self,
        token_row: torch.Tensor,
        terms: tuple[torch.Tensor, ...],
        ring: int = 3,
        copies: bool | None = None,
    ) -> None:
        """copies: stage in host buffers and copy to the device (default: unless the device is the CPU; a
        CPU test may ask for it to check the copy path without a GPU, with unpinned buffers and no events)."""
        self.token_row, self.terms = token_row, terms  # terms: (cap, strength, op) device tensors [R, J]
        self.copies = token_row.device.type != "cpu" if copies is None else copies
        if not self.copies:
            self.ring = [(token_row, None, None, None)]
        else:
            rows = terms[0].shape[0]
            cuda = token_row.device.type == "cuda"
            self.ring = [
                (
                    torch.zeros(token_row.shape, dtype=token_row.dtype, pin_memory=cuda),
                    torch.zeros(rows, dtype=torch.int64, pin_memory=cuda),
                    tuple(torch.zeros(t.shape, dtype=t.dtype, pin_memory=cuda) for t in terms),
                    torch.cuda.Event() if cuda else None,
                )
                for _ in range(ring)
            ]
            self.row_ids = torch.zeros(rows, dtype=torch.int64, device=token_row.device)
            self.contents = tuple(torch.zeros_like(t) for t in terms)
        self.turn = 0
        self.changed = 0

    def host(self) -> np.ndarray:
        """The next host buffer of per-token rows, free to write."""
        self.turn = (self.turn + 1) % len(self.ring)
        token_row, _, _, uploaded = self.ring[self.turn]
        if uploaded is not None:
            uploaded.synchronize()  # returns at once unless that copy (`ring` steps ago) has not run yet
        return token_row.numpy()

    def stage_rows(self, rows: list[int], host_terms: tuple[np.ndarray, ...]) -> None:
        """Term rows changed on the host since the last upload (on CPU they are already in place)."""
        self.changed = len(rows)
        if not self.copies or not rows:
            return
        _, row_ids, contents, _ = self.ring[self.turn]
        row_ids.numpy()[: len(rows)] = rows
        for staged, host in zip(contents, host_terms, strict=True):
            staged.numpy()[: len(rows)] = host[rows]

    def upload(self) -> None:
        token_row, row_ids, contents, uploaded = self.ring[self.turn]
        if not self.copies:
            return
        self.token_row.copy_(token_row, non_blocking=True)
        n = self.changed
        if n:
            self.row_ids[:n].copy_(row_ids[:n], non_blocking=True)
            for scratch, staged, table in zip(self.contents, contents, self.terms, strict=True):
                scratch[:n].copy_(staged[:n], non_blocking=True)
                table.index_copy_(0, self.row_ids[:n], scratch[:n])
        if uploaded is not None:
            uploaded.record()
