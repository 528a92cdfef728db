"""The CUDA kernel of `unlock::steer`: one fused Triton kernel with the math of `unlock.ops.steer_hidden`.

Why fused: the reference math is a dozen small torch ops per steered layer; on a GPU each is a launch and a
pass over [T, d], which costs 13-28% of a 7B layer's projections. One kernel with one program per token row
reads the row once when it is not steered and a few times when it is (the rows stay in cache).

Semantics, per token row t (all arithmetic in float32, loads and stores in the hidden's dtype): the token's
term row lists up to J terms (capability c_j, strength a_j, operator); w_j = a_j * gate[c_j] and r_j =
dirs[c_j]. Terms with w_j = 0 do nothing; a token with no live term is copied bit for bit. Otherwise
  s0 = h + residual;  h1 = h + sum_add w_j r_j - sum_ablate w_j (s0 . r_j) r_j
  if a rotate term is live:  s1 = h1 + residual;  u = s1/|s1| + sum_rotate w_j r_j;
                             h' = |s1| u/|u| - residual
The per-term loads are [J, BLOCK] tiles, masked to live terms. The token-row buffer may be longer than T
(a fixed address for CUDA graphs); the launch grid, not a slice, limits the kernel to the first T entries.

Triton is imported under a guard: vLLM on CPU ships a triton without a CPU backend, and a machine may have
none; this module must import there (the op then never calls it). With TRITON_INTERPRET=1 the kernel runs on
CPU tensors in Triton's interpreter, which is how the tests check it on machines without a GPU.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton at all: steer_triton raises a clear error if ever called
    triton = None

# Elements of one [J, BLOCK] tile of term rows: BLOCK = this // J (a power of two), so any hidden size works.
TILE = 2048
ABLATE, ADD, ROTATE = 1, 2, 3  # unlock.ops operator codes (this file is loaded by path without unlock)

if triton is not None:

    @triton.jit
    def _terms_tile(dirs_ptr, caps, live, dirs_stride, cols, col_mask):
        """The live terms' table rows on `cols`, float32 [J, BLOCK] (zero for dead terms)."""
        ptrs = dirs_ptr + caps[:, None] * dirs_stride + cols[None, :]
        return tl.load(ptrs, mask=live[:, None] & col_mask[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _steer_kernel(
        hidden_ptr,
        residual_ptr,
        out_ptr,
        dirs_ptr,
        gate_ptr,
        cap_ptr,
        strength_ptr,
        op_ptr,
        token_row_ptr,
        hidden_size,
        hidden_stride,
        residual_stride,
        out_stride,
        dirs_stride,
        term_stride,
        NUM_TERMS: tl.constexpr,
        TERMS: tl.constexpr,  # NUM_TERMS rounded up to a power of two
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        row = tl.load(token_row_ptr + token).to(tl.int64)
        h_ptr = hidden_ptr + token * hidden_stride
        r_ptr = residual_ptr + token * residual_stride
        o_ptr = out_ptr + token * out_stride
        js = tl.arange(0, TERMS)
        in_row = js < NUM_TERMS
        caps = tl.load(cap_ptr + row * term_stride + js, mask=in_row, other=0).to(tl.int64)
        strength = tl.load(strength_ptr + row * term_stride + js, mask=in_row, other=0.0).to(tl.float32)
        ops = tl.load(op_ptr + row * term_stride + js, mask=in_row, other=0)
        weight = strength * tl.load(gate_ptr + caps).to(tl.float32)  # [J]; row 0 has only dead terms
        w_ablate = tl.where(ops == ABLATE, weight, 0.0)
        w_add = tl.where(ops == ADD, weight, 0.0)
        w_rotate = tl.where(ops == ROTATE, weight, 0.0)
        n_ablate = tl.sum((w_ablate != 0).to(tl.int32), axis=0)
        n_edit = n_ablate + tl.sum((w_add != 0).to(tl.int32), axis=0)
        n_rotate = tl.sum((w_rotate != 0).to(tl.int32), axis=0)
        if n_edit + n_rotate == 0:
            # Not steered here (almost every token): a plain copy, bit for bit.
            for start in range(0, hidden_size, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < hidden_size
                tl.store(o_ptr + cols, tl.load(h_ptr + cols, mask=mask), mask=mask)
        else:
            # Ablation coefficients from the incoming stream s0: one pass, all terms at once.
            dots = tl.zeros([TERMS], dtype=tl.float32)
            if n_ablate > 0:
                for start in range(0, hidden_size, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < hidden_size
                    s0 = tl.load(h_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    if HAS_RESIDUAL:
                        s0 += tl.load(r_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    tile = _terms_tile(dirs_ptr, caps, w_ablate != 0, dirs_stride, cols, mask)
                    dots += tl.sum(tile * s0[None, :], axis=1)
            coef = w_add - w_ablate * dots  # [J]: each term's multiple of its row in h1 - h
            edit_live = coef != 0
            rot_live = w_rotate != 0
            if n_rotate == 0:
                for start in range(0, hidden_size, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < hidden_size
                    h = tl.load(h_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    tile = _terms_tile(dirs_ptr, caps, edit_live, dirs_stride, cols, mask)
                    h1 = h + tl.sum(coef[:, None] * tile, axis=0)
                    tl.store(o_ptr + cols, h1.to(out_ptr.dtype.element_ty), mask=mask)
            else:
                # Three passes over one row: |s1|, then |u|, then the rotated row.
                sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, hidden_size, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < hidden_size
                    s1 = tl.load(h_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    if n_edit > 0:
                        tile = _terms_tile(dirs_ptr, caps, edit_live, dirs_stride, cols, mask)
                        s1 += tl.sum(coef[:, None] * tile, axis=0)
                    if HAS_RESIDUAL:
                        s1 += tl.load(r_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    sum_sq += s1 * s1
                norm = tl.sqrt(tl.sum(sum_sq, axis=0))
                safe_norm = tl.maximum(norm, 1e-30)
                sum_sq_u = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, hidden_size, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < hidden_size
                    s1 = tl.load(h_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    if n_edit > 0:
                        tile = _terms_tile(dirs_ptr, caps, edit_live, dirs_stride, cols, mask)
                        s1 += tl.sum(coef[:, None] * tile, axis=0)
                    if HAS_RESIDUAL:
                        s1 += tl.load(r_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    rot_tile = _terms_tile(dirs_ptr, caps, rot_live, dirs_stride, cols, mask)
                    rot = tl.sum(w_rotate[:, None] * rot_tile, axis=0)
                    u = tl.where(mask, s1 / safe_norm + rot, 0.0)
                    sum_sq_u += u * u
                u_norm = tl.maximum(tl.sqrt(tl.sum(sum_sq_u, axis=0)), 1e-30)
                for start in range(0, hidden_size, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < hidden_size
                    s1 = tl.load(h_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    if n_edit > 0:
                        tile = _terms_tile(dirs_ptr, caps, edit_live, dirs_stride, cols, mask)
                        s1 += tl.sum(coef[:, None] * tile, axis=0)
                    res = tl.zeros([BLOCK], dtype=tl.float32)
                    if HAS_RESIDUAL:
                        res = tl.load(r_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    s1 += res
                    rot_tile = _terms_tile(dirs_ptr, caps, rot_live, dirs_stride, cols, mask)
                    rot = tl.sum(w_rotate[:, None] * rot_tile, axis=0)
                    turned = norm * (s1 / safe_norm + rot) / u_norm
                    tl.store(o_ptr + cols, (turned - res).to(out_ptr.dtype.element_ty), mask=mask)


def steer_triton(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    dirs: torch.Tensor,
    gate: torch.Tensor,
    term_cap: torch.Tensor,
    term_strength: torch.Tensor,
    term_op: torch.Tensor,
    token_row: torch.Tensor,
) -> torch.Tensor:
    """`unlock.ops.steer_hidden` as one Triton launch; returns a new [T, d] tensor in the hidden's dtype.

    hidden, residual: [T, d] (rows may be strided, columns contiguous); residual None means `hidden` already
    is the stream. dirs [C, d] any float dtype, gate [C] float32, term tables [R, J] (contiguous rows),
    token_row int32/int64 [>= T]. Checks only shapes and devices (host metadata): no sync, so it is safe
    inside CUDA-graph capture.
    """
    if triton is None:
        raise RuntimeError("steer_triton needs the `triton` package; install the CUDA build of torch/vLLM")
    num_tokens, hidden_size = hidden.shape
    _check(hidden, residual, dirs, gate, term_cap, term_strength, term_op, token_row)
    out = torch.empty((num_tokens, hidden_size), dtype=hidden.dtype, device=hidden.device)
    if num_tokens == 0:
        return out
    num_terms = term_cap.shape[1]
    terms = triton.next_power_of_2(num_terms)
    block = min(triton.next_power_of_2(hidden_size), max(16, TILE // terms))
    _steer_kernel[(num_tokens,)](
        hidden,
        hidden if residual is None else residual,  # never read when HAS_RESIDUAL is False
        out,
        dirs,
        gate,
        term_cap,
        term_strength,
        term_op,
        token_row,
        hidden_size,
        hidden.stride(0),
        0 if residual is None else residual.stride(0),
        out.stride(0),
        dirs.stride(0),
        term_cap.stride(0),
        NUM_TERMS=num_terms,
        TERMS=terms,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=max(1, min(8, block // 128)),
    )
    return out


def _check(hidden, residual, dirs, gate, term_cap, term_strength, term_op, token_row) -> None:
    num_tokens, hidden_size = hidden.shape
    rows = {"hidden": hidden, "dirs": dirs}
    if residual is not None:
        rows["residual"] = residual
        if residual.shape != hidden.shape or residual.dtype != hidden.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} must match hidden "
                f"{tuple(hidden.shape)} {hidden.dtype}"
            )
    for name, tensor in rows.items():
        if tensor.dim() != 2 or tensor.shape[1] != hidden_size or tensor.stride(1) != 1:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} stride {tensor.stride()}; expected "
                f"[*, {hidden_size}] with contiguous columns (call .contiguous())"
            )
    if gate.dim() != 1 or gate.shape[0] != dirs.shape[0] or gate.dtype != torch.float32:
        raise ValueError(f"gate is {gate.dtype} {tuple(gate.shape)}; expected float32 [{dirs.shape[0]}]")
    terms = {"term_cap": term_cap, "term_strength": term_strength, "term_op": term_op}
    for name, table in terms.items():
        if table.shape != term_cap.shape or table.dim() != 2 or table.stride() != term_cap.stride():
            raise ValueError(f"{name} {tuple(table.shape)} must match term_cap {tuple(term_cap.shape)}")
    if term_strength.dtype != torch.float32 or term_cap.dtype not in (torch.int32, torch.int64):
        raise ValueError("term_strength must be float32 and term_cap/term_op int32 or int64")
    index_types = (torch.int32, torch.int64)
    if token_row.dtype not in index_types or token_row.dim() != 1 or token_row.shape[0] < num_tokens:
        raise ValueError(
            f"token_row is {token_row.dtype} {tuple(token_row.shape)}; expected int32/int64 with at least "
            f"{num_tokens} entries (one per token)"
        )
    devices = {t.device for t in [*rows.values(), gate, *terms.values(), token_row]}
    on_gpu = hidden.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if len(devices) != 1 or not on_gpu:
        raise ValueError(
            f"steer_triton needs every tensor on one CUDA device; got {sorted(map(str, devices))}"
        )
