"""The CUDA kernel of `unlock::steer`: one fused Triton kernel with the math of `unlock.ops.steer_hidden`.

Why fused: the reference math is a dozen small torch ops per steered layer; on a GPU each is a launch and a
pass over [T, d], which costs 13-28% of a 7B layer's projections.

Design: one program per token, holding the token's whole row in registers (BLOCK = the hidden size rounded up
to a power of two, spread over enough warps that each thread keeps about 16 values of each row it holds).
Every input element is read once and every output element written once, in one dependent chain of four
memory round trips: the hidden row and the token's term row index (in parallel), the term row, the gate and
table rows of its live terms (in parallel with the residual), then the store. The kernel before this one
walked the row in chunks of TILE // J columns, serially, one to three passes: up to 3 * d / 256 dependent
round trips per token, which at decode sizes (T <= 64, a few programs on a GPU of 132 SMs) was latency, not
bandwidth, and cost 10-36% of a layer. docs/patch.md has the cost model.

Semantics, per token row t (all arithmetic in float32, loads and stores in the hidden's dtype): the token's
term row lists up to J terms (capability c_j, strength a_j, operator); w_j = a_j * gate[c_j] and r_j =
dirs[c_j]. Terms with w_j = 0 do nothing; a token with no live term is copied bit for bit. Otherwise
  s0 = h + residual;  h1 = h + sum_add w_j r_j - sum_ablate w_j (s0 . r_j) r_j
  if a rotate term is live:  s1 = h1 + residual;  u = s1/|s1| + sum_rotate w_j r_j;
                             h' = |s1| u/|u| - residual
summed in the reference's order (the adds, then the ablations, each in term order). The token-row buffer may
be longer than T (a fixed address for CUDA graphs); the launch grid, not a slice, limits the kernel to the
first T entries.

Triton is imported under a guard: vLLM on CPU ships a triton without a CPU backend, and a machine may have
none; this module must import there (the op then never calls it). With TRITON_INTERPRET=1 the kernel runs on
CPU tensors in Triton's interpreter, which is how the tests check its results on machines without a GPU. The
interpreter does not apply the compiler's rules (a plain global read inside the kernel runs there and fails
to compile): tests/patches/test_triton_aot.py compiles every variant for sm_80 and sm_90 as well.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.compiler.errors import CompilationError

    COMPILE_ERRORS: tuple[type[Exception], ...] = (CompilationError,)
except ImportError:  # no Triton at all: steer_triton raises a clear error if ever called
    triton = None
    COMPILE_ERRORS = ()

# unlock.ops's operator codes (this file is loaded by path, without unlock, by bench/gpu/check_steer.py).
OPERATOR_CODES = {"ablate": 1, "add": 2, "rotate": 3}
VALUES_PER_THREAD = 8  # of each row a thread holds: sets the warps per program (registers, not spills)
MAX_WARPS = 32  # 1024 threads, the most a program may have

if triton is not None:
    # A kernel reads globals only as constexprs: the compiler refuses a plain int (the interpreter does not).
    ABLATE = tl.constexpr(OPERATOR_CODES["ablate"])
    ADD = tl.constexpr(OPERATOR_CODES["add"])
    ROTATE = tl.constexpr(OPERATOR_CODES["rotate"])

    @triton.jit
    def _term(cap_ptr, strength_ptr, op_ptr, gate_ptr, base, j):
        """Term j of a term row: its table row, weight (strength times the layer's gate) and operator."""
        cap = tl.load(cap_ptr + base + j).to(tl.int64)
        weight = tl.load(strength_ptr + base + j).to(tl.float32) * tl.load(gate_ptr + cap).to(tl.float32)
        return cap, weight, tl.load(op_ptr + base + j)

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
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        in_row = cols < hidden_size
        # The hidden row does not depend on the term lookup: both loads are in flight at once.
        h_in = tl.load(hidden_ptr + token * hidden_stride + cols, mask=in_row)
        base = tl.load(token_row_ptr + token).to(tl.int64) * term_stride
        n_live = 0
        n_ablate = 0
        n_rotate = 0
        for term in tl.static_range(NUM_TERMS):
            cap, weight, op = _term(cap_ptr, strength_ptr, op_ptr, gate_ptr, base, term)
            n_live += (weight != 0).to(tl.int32)
            n_ablate += ((weight != 0) & (op == ABLATE)).to(tl.int32)
            n_rotate += ((weight != 0) & (op == ROTATE)).to(tl.int32)
        o_ptrs = out_ptr + token * out_stride + cols
        if n_live == 0:
            # Not steered here (almost every token): the row as loaded, bit for bit.
            tl.store(o_ptrs, h_in, mask=in_row)
        else:
            h = h_in.to(tl.float32)
            res = tl.zeros([BLOCK], dtype=tl.float32)
            if HAS_RESIDUAL and n_ablate + n_rotate > 0:  # `add` alone never needs the stream
                res = tl.load(residual_ptr + token * residual_stride + cols, mask=in_row, other=0.0)
                res = res.to(tl.float32)
            # A loop, not unrolled: one table row in registers at a time (unrolled, a 70B's rows spill).
            # A dead term's load is masked off, so each live term costs one round trip, no more.
            edit = tl.zeros([BLOCK], dtype=tl.float32)
            rot = tl.zeros([BLOCK], dtype=tl.float32)
            for j in range(NUM_TERMS):
                cap, weight, op = _term(cap_ptr, strength_ptr, op_ptr, gate_ptr, base, j)
                live = cols < tl.where((weight != 0) & (op != ABLATE), hidden_size, 0)
                row = tl.load(dirs_ptr + cap * dirs_stride + cols, mask=live, other=0.0).to(tl.float32)
                edit += tl.where(op == ADD, weight, 0.0) * row
                rot += tl.where(op == ROTATE, weight, 0.0) * row
            if n_ablate > 0:
                # Ablations (rare) are measured on the incoming stream s0: a reduction per live term.
                s0 = h + res
                for k in range(NUM_TERMS):
                    cap, weight, op = _term(cap_ptr, strength_ptr, op_ptr, gate_ptr, base, k)
                    w_ablate = tl.where(op == ABLATE, weight, 0.0)
                    live = cols < tl.where(w_ablate != 0, hidden_size, 0)
                    row = tl.load(dirs_ptr + cap * dirs_stride + cols, mask=live, other=0.0).to(tl.float32)
                    edit -= (w_ablate * tl.sum(s0 * row, axis=0)) * row
            out = h + edit
            if n_rotate > 0:
                s1 = out + res
                norm = tl.sqrt(tl.sum(s1 * s1, axis=0))
                u = s1 / tl.maximum(norm, 1e-30) + rot
                u_norm = tl.maximum(tl.sqrt(tl.sum(u * u, axis=0)), 1e-30)
                out = norm * u / u_norm - res
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=in_row)


def launch_config(hidden_size: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a hidden size: the whole row in one tile, about VALUES_PER_THREAD values of it
    per thread (past MAX_WARPS * 32 * VALUES_PER_THREAD = 16384 columns a thread holds more)."""
    block = 1 << max(0, hidden_size - 1).bit_length()
    return block, max(1, min(MAX_WARPS, block // (32 * VALUES_PER_THREAD)))


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
    block, num_warps = launch_config(hidden_size)
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
        NUM_TERMS=term_cap.shape[1],
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=num_warps,
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
