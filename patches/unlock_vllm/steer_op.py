"""The per-layer steering op `torch.ops.unlock.steer`, opaque to torch.compile and safe in CUDA graphs.

Out-of-place, with a fake (meta) implementation, so Dynamo/Inductor keep it as one node inside compiled
and graphed regions instead of splitting the graph. The CPU kernel applies the reference math
`unlock.ops.steer_hidden` to the steered tokens only; the CUDA kernel is always the fused Triton kernel
(as eager torch ops the math costs 13-28% of a GPU layer): `check_cuda_kernel` builds and runs it at model
load, so a machine where Triton cannot build (no C compiler for its launcher) fails at start. The index
buffers are longer than the batch (fixed address) and are sliced to the hidden's token count inside the
kernels, so that slice stays symbolic under compile.
"""

from __future__ import annotations

import torch

from unlock.ops import steer_hidden
from unlock_vllm.triton_steer import steer_triton  # imports anywhere: Triton itself is imported under a guard


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


@steer.register_kernel("cpu")
def _steer_cpu(hidden, residual, add_table, rot_table, add_index, rot_index):
    """CPU runs the op eagerly even inside compiled models (no graph capture), so it may branch on the
    indices: the reference math touches only steered tokens, and a step that steers none costs one copy
    (the full math on every token of every layer was most of what steering cost a CPU server)."""
    num_tokens = hidden.shape[0]
    add_index, rot_index = add_index[:num_tokens], rot_index[:num_tokens]
    added = add_index.nonzero().squeeze(-1)
    if added.numel() == num_tokens:  # `add` mode's usual step: every token, no indexing needed
        out = hidden + add_table[add_index].to(hidden.dtype)
    else:
        out = hidden.clone()  # a custom op's output may not alias its inputs
        if added.numel():
            out[added] = hidden[added] + add_table[add_index[added]].to(hidden.dtype)
    rotated = rot_index.nonzero().squeeze(-1)
    if rotated.numel():  # out[rotated] already holds the add: rotate it with no further add
        out[rotated] = steer_hidden(
            out[rotated],
            None if residual is None else residual[rotated],
            add_table,
            rot_table,
            torch.zeros_like(rotated),
            rot_index[rotated],
        )
    return out


def check_cuda_kernel(device: torch.device, dtype: torch.dtype) -> None:
    """Build and run the Triton kernel once on `device` and compare it with the reference math; a
    RuntimeError that says what is missing otherwise. Runs at model load, before warm-up and capture."""
    generator = torch.Generator().manual_seed(0)
    hidden, residual = (torch.randn(4, 64, generator=generator).to(device, dtype) for _ in range(2))
    add_table, rot_table = (torch.randn(3, 64, generator=generator).to(device, dtype) for _ in range(2))
    add_table[0], rot_table[0] = 0, 0
    add_index = torch.tensor([0, 1, 2, 0], device=device)
    rot_index = torch.tensor([0, 0, 1, 2], device=device)
    try:
        got = steer_triton(hidden, residual, add_table, rot_table, add_index, rot_index)
        torch.cuda.synchronize(device)
    except Exception as exc:
        raise RuntimeError(
            f"unlock: the fused Triton steering kernel does not build or run on {device} "
            f"({type(exc).__name__}: {exc}); Triton needs a C compiler (cc) at run time to build its launcher"
        ) from exc
    want = steer_hidden(hidden, residual, add_table, rot_table, add_index, rot_index)
    if not torch.allclose(got.float(), want.float(), atol=1e-2, rtol=1e-2):
        raise RuntimeError(f"unlock: the Triton steering kernel disagrees with the reference on {device}")


@steer.register_kernel("cuda")
def _steer_cuda(hidden, residual, add_table, rot_table, add_index, rot_index):
    return steer_triton(hidden, residual, add_table, rot_table, add_index, rot_index)
