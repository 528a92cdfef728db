"""Host-to-device staging of the per-step index buffers (torch and numpy only, so the GPU check loads it
by path on a machine without vLLM)."""

from __future__ import annotations

import numpy as np
import torch


class Staging:
    """Where the host writes a step's indices before they reach the device buffers.

    On CPU the device buffers themselves. On GPUs, pinned host copies uploaded with non-blocking copies
    (no sync in the step), a few in rotation: with asynchronous scheduling the host lays out step n+1
    while step n's copy may still wait in the stream, so a copy is reused only after its event fired.
    """

    def __init__(self, add_index: torch.Tensor, rot_index: torch.Tensor, ring: int = 3) -> None:
        self.add_index, self.rot_index = add_index, rot_index
        if add_index.device.type == "cpu":
            self.ring = [(add_index, rot_index, None)]
        else:
            self.ring = [
                (
                    torch.zeros(add_index.shape, dtype=add_index.dtype, pin_memory=True),
                    torch.zeros(rot_index.shape, dtype=rot_index.dtype, pin_memory=True),
                    torch.cuda.Event(),
                )
                for _ in range(ring)
            ]
        self.turn = 0

    def host(self) -> tuple[np.ndarray, np.ndarray]:
        """The next pair of host buffers, free to write."""
        self.turn = (self.turn + 1) % len(self.ring)
        add, rot, uploaded = self.ring[self.turn]
        if uploaded is not None:
            uploaded.synchronize()  # returns at once unless that copy (`ring` steps ago) has not run yet
        return add.numpy(), rot.numpy()

    def upload(self) -> None:
        add, rot, uploaded = self.ring[self.turn]
        if uploaded is not None:
            self.add_index.copy_(add, non_blocking=True)
            self.rot_index.copy_(rot, non_blocking=True)
            uploaded.record()
