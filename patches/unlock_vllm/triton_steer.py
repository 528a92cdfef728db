"""The CUDA kernel of `unlock::steer`: one fused Triton kernel with the math of `unlock.ops.steer_hidden`.

Why fused: the reference math is about ten small torch ops per steered layer (gather, add, two norms, divides,
where); on a GPU each is a launch and a pass over [T, d], which costs 13-28% of a 7B layer's projections. One
kernel with one program per token row reads each row once or three times (only rotated rows, which are few:
one last prompt token per request) and writes it once.

Semantics, per token row t (all arithmetic in float32, loads and stores in the hidden's dtype):
  h' = h + add_table[add_index[t]]  (the row rounded to the hidden's dtype first, as the reference does)
  if rot_index[t] > 0:  s = h' + residual; u = s/|s| + rot_table[rot_index[t]];  h' = |s| u/|u| - residual
Rows with add_index 0 and rot_index 0 are copied, bit for bit. The index buffers may be longer than T (fixed
addresses for CUDA graphs); the launch grid, not a slice, limits the kernel to the first T entries.

Triton is imported under a guard: vLLM on CPU ships a triton without a CPU backend, and a machine may have
none; this module must import there (the op then never calls it).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton at all: steer_triton raises a clear error if ever called
    triton = None

# Columns per block: a power of two; the row is walked in blocks so any hidden size works.
MAX_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _added_row(h_ptr, a_ptr, cols, mask, add_cols):
        """h + add row for one block, rounded to the hidden's dtype as the reference's `hidden + add_rows` is.

        add_cols is the number of columns to read from the add row: 0 for row 0, which leaves h untouched.
        """
        dtype = h_ptr.dtype.element_ty
        h = tl.load(h_ptr + cols, mask=mask, other=0.0)
        a = tl.load(a_ptr + cols, mask=cols < add_cols, other=0.0)
        added = (h.to(tl.float32) + a.to(dtype).to(tl.float32)).to(dtype)
        return tl.where(add_cols > 0, added, h)

    @triton.jit
    def _stream(h_ptr, r_ptr, a_ptr, cols, mask, add_cols, HAS_RESIDUAL: tl.constexpr):
        """(s, residual) for one block in float32; s = h' + residual rounded to the hidden's dtype first."""
        dtype = h_ptr.dtype.element_ty
        hidden = _added_row(h_ptr, a_ptr, cols, mask, add_cols)
        if HAS_RESIDUAL:
            res = tl.load(r_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            stream = (hidden.to(tl.float32) + res).to(dtype).to(tl.float32)
        else:
            res = tl.zeros_like(hidden.to(tl.float32))
            stream = hidden.to(tl.float32)
        return stream, res

    @triton.jit
    def _steer_kernel(
        hidden_ptr,
        residual_ptr,
        out_ptr,
        add_table_ptr,
        rot_table_ptr,
        add_index_ptr,
        rot_index_ptr,
        hidden_size,
        hidden_stride,
        residual_stride,
        out_stride,
        add_stride,
        rot_stride,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        add_row = tl.load(add_index_ptr + token).to(tl.int64)
        rot_row = tl.load(rot_index_ptr + token).to(tl.int64)
        add_cols = tl.where(add_row != 0, hidden_size, 0)
        h_ptr = hidden_ptr + token * hidden_stride
        r_ptr = residual_ptr + token * residual_stride
        o_ptr = out_ptr + token * out_stride
        a_ptr = add_table_ptr + add_row * add_stride
        q_ptr = rot_table_ptr + rot_row * rot_stride
        if rot_row == 0:
            # Not rotated (almost every token): one pass, and a plain copy when the add row is 0 too.
            for start in range(0, hidden_size, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < hidden_size
                tl.store(o_ptr + cols, _added_row(h_ptr, a_ptr, cols, mask, add_cols), mask=mask)
        else:
            # Three passes over one row (it stays in cache): |s|, then |u|, then the rotated row.
            sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, hidden_size, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < hidden_size
                stream, res = _stream(h_ptr, r_ptr, a_ptr, cols, mask, add_cols, HAS_RESIDUAL)
                sum_sq += stream * stream
            norm = tl.sqrt(tl.sum(sum_sq, axis=0))
            safe_norm = tl.maximum(norm, 1e-30)
            sum_sq_u = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, hidden_size, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < hidden_size
                stream, res = _stream(h_ptr, r_ptr, a_ptr, cols, mask, add_cols, HAS_RESIDUAL)
                rot = tl.load(q_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                u = tl.where(mask, stream / safe_norm + rot, 0.0)
                sum_sq_u += u * u
            u_norm = tl.maximum(tl.sqrt(tl.sum(sum_sq_u, axis=0)), 1e-30)
            for start in range(0, hidden_size, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < hidden_size
                stream, res = _stream(h_ptr, r_ptr, a_ptr, cols, mask, add_cols, HAS_RESIDUAL)
                rot = tl.load(q_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                rotated = norm * (stream / safe_norm + rot) / u_norm
                tl.store(o_ptr + cols, (rotated - res).to(out_ptr.dtype.element_ty), mask=mask)


def steer_triton(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    add_table: torch.Tensor,
    rot_table: torch.Tensor,
    add_index: torch.Tensor,
    rot_index: torch.Tensor,
) -> torch.Tensor:
    """`unlock.ops.steer_hidden` as one Triton launch; returns a new [T, d] tensor in the hidden's dtype.

    hidden, residual: [T, d] CUDA tensors (rows may be strided, columns contiguous); residual None means
    `hidden` already is the stream. add_table, rot_table: [R, d], row 0 zero, any float dtype. add_index,
    rot_index: int32/int64 [>= T]. Checks only shapes and devices (host metadata): no sync, so it is safe
    inside CUDA-graph capture.
    """
    if triton is None:
        raise RuntimeError("steer_triton needs the `triton` package; install the CUDA build of torch/vLLM")
    num_tokens, hidden_size = hidden.shape
    _check(hidden, residual, add_table, rot_table, add_index, rot_index)
    out = torch.empty((num_tokens, hidden_size), dtype=hidden.dtype, device=hidden.device)
    if num_tokens == 0:
        return out
    block = min(triton.next_power_of_2(hidden_size), MAX_BLOCK)
    _steer_kernel[(num_tokens,)](
        hidden,
        hidden if residual is None else residual,  # never read when HAS_RESIDUAL is False
        out,
        add_table,
        rot_table,
        add_index,
        rot_index,
        hidden_size,
        hidden.stride(0),
        0 if residual is None else residual.stride(0),
        out.stride(0),
        add_table.stride(0),
        rot_table.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=max(1, min(8, block // 128)),
    )
    return out


def _check(hidden, residual, add_table, rot_table, add_index, rot_index) -> None:
    num_tokens, hidden_size = hidden.shape
    named = {"hidden": hidden, "add_table": add_table, "rot_table": rot_table}
    if residual is not None:
        named["residual"] = residual
        if residual.shape != hidden.shape or residual.dtype != hidden.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} must match hidden "
                f"{tuple(hidden.shape)} {hidden.dtype}"
            )
    for name, tensor in named.items():
        if tensor.dim() != 2 or tensor.shape[1] != hidden_size or tensor.stride(1) != 1:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} stride {tensor.stride()}; expected "
                f"[*, {hidden_size}] with contiguous columns (call .contiguous())"
            )
    for name, index in {"add_index": add_index, "rot_index": rot_index}.items():
        if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1 or index.shape[0] < num_tokens:
            raise ValueError(
                f"{name} is {index.dtype} {tuple(index.shape)}; expected int32/int64 with at least "
                f"{num_tokens} entries (one per token)"
            )
    devices = {tensor.device for tensor in [*named.values(), add_index, rot_index]}
    if len(devices) != 1 or hidden.device.type != "cuda":
        raise ValueError(
            f"steer_triton needs every tensor on one CUDA device; got {sorted(map(str, devices))}"
        )
