"""The per-layer steering op `torch.ops.unlock.steer`, opaque to torch.compile and safe in CUDA graphs.

Out-of-place, with a fake (meta) implementation, so Dynamo/Inductor keep it as one node inside compiled
and graphed regions instead of splitting the graph. The CPU kernel is the reference math
`unlock.ops.steer_hidden` (it touches only the steered tokens and composes each term row once; on CPU the op
runs eagerly, with no graph capture, so it may branch on the indices). The CUDA kernel is always the fused
Triton kernel (as eager torch ops the math costs 13-28% of a GPU layer): `check_cuda_kernel` builds and runs
it at model load, so a machine where it cannot compile or launch fails at start, saying which.
The token-row buffer is longer than the batch (fixed address) and is sliced to the hidden's token count
inside the kernels, so that slice stays symbolic under compile. `layer` (the decoder layer's global index, a
constant of each call site) lets capture mode (`unlock_vllm.capture`) read the stream the op is handed.
"""

from __future__ import annotations

import torch

from unlock.ops import steer_hidden
from unlock_vllm import capture
from unlock_vllm.triton_steer import COMPILE_ERRORS, steer_triton  # imports anywhere (Triton is guarded)


@torch.library.custom_op("unlock::steer", mutates_args=())
def steer(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    dirs: torch.Tensor,
    gate: torch.Tensor,
    term_cap: torch.Tensor,
    term_strength: torch.Tensor,
    term_op: torch.Tensor,
    token_row: torch.Tensor,
    layer: int = -1,
) -> torch.Tensor:
    """hidden, residual: [T, d]; the layer's tables (`unlock.ops`); token_row int64 [>= T]. Returns the new
    hidden. This body is the CPU kernel (and any device's but CUDA's)."""
    capture.record(layer, hidden, residual)
    return steer_hidden(hidden, residual, dirs, gate, term_cap, term_strength, term_op, token_row)


@steer.register_fake
def _steer_fake(hidden, residual, dirs, gate, term_cap, term_strength, term_op, token_row, layer=-1):
    return torch.empty_like(hidden)


def check_cuda_kernel(device: torch.device, dtype: torch.dtype) -> None:
    """Build and run the Triton kernel once on `device` and compare it with the reference math; a
    RuntimeError that says what is missing otherwise. Runs at model load, before warm-up and capture."""
    generator = torch.Generator().manual_seed(0)
    hidden, residual = (torch.randn(5, 64, generator=generator).to(device, dtype) for _ in range(2))
    dirs = torch.randn(4, 64, generator=generator)
    dirs[0] = 0
    dirs[[1, 3]] /= dirs[[1, 3]].norm(dim=-1, keepdim=True)  # 1: rotate, 2: add, 3: ablate (unit rows)
    dirs = dirs.to(device, dtype)
    gate = torch.tensor([0.0, 1, 1, 1], device=device)
    term_cap = torch.tensor([[0, 0, 0], [2, 0, 0], [1, 2, 0], [3, 2, 1]], device=device)
    term_strength = torch.tensor([[0, 0, 0], [0.5, 0, 0], [0.7, -0.3, 0], [1.0, 0.2, 0.4]], device=device)
    term_op = torch.tensor([[0, 0, 0], [2, 0, 0], [3, 2, 0], [1, 2, 3]], device=device)
    token_row = torch.tensor([0, 1, 2, 3, 3, 0], device=device)
    args = (hidden, residual, dirs, gate, term_cap, term_strength, term_op, token_row)
    try:
        got = steer_triton(*args)
        torch.cuda.synchronize(device)
    except Exception as exc:
        raise RuntimeError(kernel_failure(device, exc)) from exc
    want = steer_hidden(*args)
    if not torch.allclose(got.float(), want.float(), atol=1e-2, rtol=1e-2):
        raise RuntimeError(f"unlock: the Triton steering kernel disagrees with the reference on {device}")


def kernel_failure(device: torch.device, exc: Exception) -> str:
    """Why the kernel's first launch failed, the real exception first: a Triton compile error is a bug in the
    kernel, not a missing tool on the machine, and is named as such."""
    if isinstance(exc, COMPILE_ERRORS):
        return (
            f"unlock: Triton could not compile the fused steering kernel for {device} "
            f"({type(exc).__name__}: {exc}); this is a bug in unlock_vllm/triton_steer.py"
        )
    return (
        f"unlock: the fused Triton steering kernel failed its first launch on {device} "
        f"({type(exc).__name__}: {exc})"
    )


@steer.register_kernel("cuda")
def _steer_cuda(hidden, residual, dirs, gate, term_cap, term_strength, term_op, token_row, layer=-1):
    capture.record(layer, hidden, residual)  # Python: runs in eager steps only, as capture steps are
    return steer_triton(hidden, residual, dirs, gate, term_cap, term_strength, term_op, token_row)
