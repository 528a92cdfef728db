"""The per-layer steering op `torch.ops.unlock.steer`, opaque to torch.compile and safe in CUDA graphs.

Out-of-place, with a fake (meta) implementation, so Dynamo/Inductor keep it as one node inside compiled
and graphed regions instead of splitting the graph. The CPU kernel is the reference math
`unlock.ops.steer_hidden`; the CUDA kernel is the fused Triton kernel when `unlock_vllm.triton_steer`
exists. The index buffers are longer than the batch (fixed address) and are sliced to the hidden's token
count inside the kernels, so that slice stays symbolic under compile.
"""

from __future__ import annotations

import logging

import torch

from unlock.ops import steer_hidden

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's configured "vllm" logger


@torch.library.custom_op("unlock::steer", mutates_args=())
def steer(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    add_table: torch.Tensor,
    rot_table: torch.Tensor,
    add_index: torch.Tensor,
    rot_index: torch.Tensor,
) -> torch.Tensor:
    """hidden, residual: [T, d]; tables [R, d] (row 0 zero); indices int64 [>= T]. Returns the new hidden."""
    return steer_hidden(hidden, residual, add_table, rot_table, add_index, rot_index)


@steer.register_fake
def _steer_fake(hidden, residual, add_table, rot_table, add_index, rot_index):
    return torch.empty_like(hidden)


def _cuda_kernel():
    """The Triton kernel when its module is present; the reference math otherwise (logged once)."""
    try:
        from unlock_vllm.triton_steer import steer_triton
    except ImportError as exc:
        logger.warning("unlock: Triton steering kernel unavailable (%s); using unlock.ops.steer_hidden", exc)
        return steer_hidden
    return steer_triton


_cuda_impl = None


@steer.register_kernel("cuda")
def _steer_cuda(hidden, residual, add_table, rot_table, add_index, rot_index):
    global _cuda_impl
    if _cuda_impl is None:  # resolved once, at the first (warm-up) call, never during graph replay
        _cuda_impl = _cuda_kernel()
    return _cuda_impl(hidden, residual, add_table, rot_table, add_index, rot_index)
