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

    def __init__(self, token_row: torch.Tensor, terms: tuple[torch.Tensor, ...], ring: int = 3) -> None:
        self.token_row, self.terms = token_row, terms  # terms: (cap, strength, op) device tensors [R, J]
        self.cpu = token_row.device.type == "cpu"
        if self.cpu:
            self.ring = [(token_row, None, None, None)]
        else:
            rows = terms[0].shape[0]
            self.ring = [
                (
                    torch.zeros(token_row.shape, dtype=token_row.dtype, pin_memory=True),
                    torch.zeros(rows, dtype=torch.int64, pin_memory=True),
                    tuple(torch.zeros(t.shape, dtype=t.dtype, pin_memory=True) for t in terms),
                    torch.cuda.Event(),
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
        if self.cpu or not rows:
            return
        _, row_ids, contents, _ = self.ring[self.turn]
        row_ids.numpy()[: len(rows)] = rows
        for staged, host in zip(contents, host_terms, strict=True):
            staged.numpy()[: len(rows)] = host[rows]

    def upload(self) -> None:
        token_row, row_ids, contents, uploaded = self.ring[self.turn]
        if uploaded is None:
            return
        self.token_row.copy_(token_row, non_blocking=True)
        n = self.changed
        if n:
            self.row_ids[:n].copy_(row_ids[:n], non_blocking=True)
            for scratch, staged, table in zip(self.contents, contents, self.terms, strict=True):
                scratch[:n].copy_(staged[:n], non_blocking=True)
                table.index_copy_(0, self.row_ids[:n], scratch[:n])
        uploaded.record()
