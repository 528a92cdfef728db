"""GPU check of the fused steering kernel: correctness, torch.compile + CUDA graphs, cost per steered layer.

Self-contained on purpose (torch + Triton only; our two files loaded by path), so it runs on a bare GPU
machine without vLLM or transformers:
  (a) registers `steer_triton` as the CUDA kernel of a torch custom op `unlock::steer` with a fake impl, the
      way `unlock_vllm.steer_op` does;
  (b) checks it against `unlock.ops.steer_hidden` (float32 and bfloat16, with and without a residual) on term
      rows mixing every operator (add, rotate, ablate): steered rows within tolerance (also against the
      equations in float64), untouched rows (row 0, a capability gated off the layer) bit-identical to the
      input, a -0.0 included;
  (c) runs the op inside a torch.compile'd toy decoder layer (Qwen2.5-7B shapes: the four projections as
      matmuls, RMSNorm, SiLU gate; attention left out) and under CUDA-graph capture; writes new per-token
      rows, a term row and inputs in place between replays and checks replay == eager;
  (e) the host-to-device staging of a step's rows with the host running ahead of the GPU (as under
      asynchronous scheduling): the stream is stalled, several steps are written and uploaded (per-token rows
      and a term row an admission changed), and each step's consumer must read its own; a single staging
      buffer is run too, to show the race exists;
  (d) times, per steered layer with CUDA graphs, at T = 1, 8, 64, 512, 8192 tokens: the kernel alone, the
      torch-ops reference, and the toy layer without and with the op.

Usage: python bench/gpu/check_steer.py            (CUDA; <device>.json/.txt into $OUT or bench/gpu/results)
       python bench/gpu/check_steer.py --dry-run  (CPU: reference path, op registration, compile, report)
Exit status 1 when a check fails.
"""

import argparse
import importlib.util
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
TOKEN_COUNTS = (1, 8, 64, 512, 8192)
# Qwen2.5-7B: hidden 3584, 28 query heads and 4 KV heads of 128, MLP 18944.
QWEN7B = {"hidden": 3584, "q": 28 * 128, "kv": 4 * 128, "intermediate": 18944}
TINY = {"hidden": 96, "q": 96, "kv": 32, "intermediate": 192}
NUM_CAPS = 8  # capability rows, row 0 zero, the last gated off (it does not steer the layer)
NUM_ROWS = 9  # term rows, row 0 = "not steered" (make_tables lists them)
TERMS = 8  # terms per row: unlock_vllm.request.MAX_SELECTED
PATTERNS = ("none", "add", "mixed", "rotate_all", "ablate_all")  # make_rows
GOAL_PCT, GOAL_MAX_TOKENS = 3.0, 64  # issue 27: the kernel at decode sizes, as a share of the toy layer
TIME_BUDGET_S = 200  # timings stop (and say so) past this, so the whole run stays under 4 minutes


def load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ops = load_by_path("unlock_ops", REPO / "unlock" / "ops.py")
triton_steer = load_by_path("unlock_triton_steer", REPO / "patches" / "unlock_vllm" / "triton_steer.py")
staging = load_by_path("unlock_staging", REPO / "patches" / "unlock_vllm" / "staging.py")


# (a) the op, registered as the plugin registers it: reference math by default, Triton on CUDA, a fake impl.
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
) -> torch.Tensor:
    return ops.steer_hidden(hidden, residual, dirs, gate, term_cap, term_strength, term_op, token_row)


@steer.register_fake
def _steer_fake(hidden, residual, dirs, gate, term_cap, term_strength, term_op, token_row):
    return torch.empty_like(hidden)


steer.register_kernel("cuda")(triton_steer.steer_triton)


class Report:
    """Collects check results and timings, echoes lines, and writes JSON + text at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.checks: list[dict] = []
        self.timings: list[dict] = []

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def check(self, name: str, ok: bool, **details) -> None:
        self.checks.append({"name": name, "ok": bool(ok), **details})
        shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in details.items())
        self.say(f"[{'PASS' if ok else 'FAIL'}] {name} {shown}")

    @property
    def failed(self) -> list[str]:
        return [c["name"] for c in self.checks if not c["ok"]]


def make_tables(hidden_size: int, device, dtype, generator) -> tuple[torch.Tensor, ...]:
    """A layer's tables as the plugin builds them (`unlock.ops`): NUM_CAPS capability rows (row 0 zero,
    the last one gated off: a capability that does not steer this layer), unit rows for rotate/ablate;
    NUM_ROWS term rows, each a mix of up to TERMS (capability, strength, operator) terms.

    Term rows by kind: 1..3 add only, 4..5 rotate (+ add), 6..7 ablate (+ add), 8 every operator."""
    raw = torch.randn(NUM_CAPS, hidden_size, generator=generator)
    raw[0] = 0
    unit = raw / raw.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    dirs = raw * 0.05  # add rows, raw
    rotate_caps, ablate_caps = (1, 2, 3), (4, 5)
    dirs[list(rotate_caps + ablate_caps)] = unit[list(rotate_caps + ablate_caps)]
    gate = torch.ones(NUM_CAPS)
    gate[0] = gate[NUM_CAPS - 1] = 0
    add, rot, abl = ops.ADD.code, ops.ROTATE.code, ops.ABLATE.code
    rows = [
        [],
        [(6, 1.0, add)],
        [(6, 0.5, add), (7, -1.0, add)],
        [(NUM_CAPS - 1, 1.0, add)],  # gated off: such tokens are copied
        [(1, 0.3, rot)],
        [(2, 0.8, rot), (3, -0.2, rot), (6, 1.0, add)],
        [(4, 1.0, abl)],
        [(4, 0.5, abl), (5, 1.0, abl), (7, 2.0, add)],
        [(5, 0.7, abl), (6, 1.0, add), (1, 0.4, rot), (3, 0.1, rot)],
    ]
    term_cap = torch.zeros(NUM_ROWS, TERMS, dtype=torch.int64)
    term_strength = torch.zeros(NUM_ROWS, TERMS)
    term_op = torch.zeros(NUM_ROWS, TERMS, dtype=torch.int64)
    for r, terms in enumerate(rows):
        for j, (cap, strength, op) in enumerate(terms):
            term_cap[r, j], term_strength[r, j], term_op[r, j] = cap, strength, op
    return (dirs.to(device, dtype), gate.to(device), term_cap.to(device), term_strength.to(device),
            term_op.to(device))  # fmt: skip


def make_rows(num_tokens: int, pattern: str, device, generator) -> torch.Tensor:
    """The int64 per-token term rows, longer than T (the tail is junk the op must ignore).

    none: nothing steered; add: every token an add-only row; mixed: random rows (some 0) with every 8th
    token a rotate row (a batch of requests at their last prompt token); rotate_all: every token rotated;
    ablate_all: every token ablated.
    """
    length = num_tokens + 13
    if pattern == "none":
        rows = torch.zeros(length, dtype=torch.int64)
    elif pattern == "add":
        rows = torch.arange(length) % 2 + 1
    elif pattern == "mixed":
        rows = torch.randint(0, 4, (length,), generator=generator)
        rows[::8] = torch.randint(4, NUM_ROWS, (len(rows[::8]),), generator=generator)
    elif pattern == "rotate_all":
        rows = torch.randint(4, 6, (length,), generator=generator)
    elif pattern == "ablate_all":
        rows = torch.randint(6, 8, (length,), generator=generator)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    rows[num_tokens:] = NUM_ROWS - 1  # junk past T: steering it would show up as a mismatch
    return rows.to(device)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 vs 0.0 and NaN payloads count as differences."""
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


def exact_steer(hidden, residual, dirs, gate, term_cap, term_strength, term_op, token_row) -> torch.Tensor:
    """The equations of `unlock.ops` in float64 with no intermediate rounding, token by token: an
    independent reading of steer_hidden (which computes in float32 whatever its inputs)."""
    out = hidden.double().clone()
    for t in range(hidden.shape[0]):
        row = int(token_row[t])
        terms = [
            (int(op), float(a) * float(gate[c]), dirs[c].double())
            for c, a, op in zip(term_cap[row], term_strength[row], term_op[row], strict=True)
            if int(c) > 0 and float(a) * float(gate[c]) != 0
        ]
        if not terms:
            continue
        res = 0 if residual is None else residual[t].double()
        h = hidden[t].double()
        s0 = h + res
        for op, a, r in terms:
            if op == ops.ABLATE.code:
                h = h - a * (s0 @ r) * r
            elif op == ops.ADD.code:
                h = h + a * r
        rot = [a * r for op, a, r in terms if op == ops.ROTATE.code]
        if rot:
            s = h + res
            u = s / s.norm() + sum(rot)
            h = s.norm() * u / u.norm() - res
        out[t] = h
    return out


def check_kernel(report: Report, impl, device, dtypes, token_counts, hidden_sizes) -> None:
    """(b): `impl` (the op) against steer_hidden in the same dtype and against float64 math; tokens with no
    live term (row 0, or a gated-off capability) come back bit for bit, a -0.0 included."""
    generator = torch.Generator().manual_seed(0)
    tolerance = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}  # relative to the row's largest |value|
    for dtype in dtypes:
        for hidden_size in hidden_sizes:
            for num_tokens in token_counts:
                for with_residual in (True, False):
                    tables = make_tables(hidden_size, device, dtype, generator)
                    token_row = make_rows(num_tokens, "mixed", device, generator)
                    token_row[: min(4, num_tokens)] = torch.tensor([4, 6, 8, 3][: min(4, num_tokens)])
                    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(device, dtype)
                    hidden[:, 0] = -0.0  # must survive untouched rows
                    residual = (torch.randn(num_tokens, hidden_size, generator=generator) * 4).to(
                        device, dtype
                    )
                    residual = residual if with_residual else None
                    args = (hidden, residual, *tables, token_row)
                    out = impl(*args)
                    ref = ops.steer_hidden(*args)
                    exact = exact_steer(*(a.cpu() if a is not None else None for a in args)).to(device)
                    rows = token_row[:num_tokens]
                    untouched = (rows == 0) | (rows == 3)
                    steered = ~untouched
                    scale = ref.float().abs().amax(dim=-1, keepdim=True)
                    err_ref = ((out.float() - ref.float()).abs() / scale)[steered].max().item()
                    err_exact = ((out.double() - exact).abs() / scale)[steered].max().item()
                    ref_err_exact = ((ref.double() - exact).abs() / scale)[steered].max().item()
                    ok = (
                        err_ref <= tolerance[dtype]
                        and err_exact <= max(2 * ref_err_exact, tolerance[dtype])
                        and torch.equal(bits(out[untouched]), bits(hidden[untouched]))
                        and out.dtype == hidden.dtype
                    )
                    report.check(
                        f"kernel {str(dtype)[6:]} d={hidden_size} T={num_tokens} residual={with_residual}",
                        ok,
                        steered_rel_err_vs_ref=err_ref,
                        steered_rel_err_vs_f64=err_exact,
                        ref_rel_err_vs_f64=ref_err_exact,
                        steered_rows=int(steered.sum()),
                        untouched_rows=int(untouched.sum()),
                    )


def check_reference(report: Report) -> None:
    """--dry-run: steer_hidden against the float64 equations (CPU)."""
    generator = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for with_residual in (True, False):
            tables = make_tables(48, "cpu", dtype, generator)
            token_row = make_rows(11, "mixed", "cpu", generator)
            token_row[:4] = torch.tensor([8, 0, 5, 7])
            hidden = torch.randn(11, 48, generator=generator).to(dtype)
            residual = (torch.randn(11, 48, generator=generator) * 4).to(dtype) if with_residual else None
            args = (hidden, residual, *tables, token_row)
            ref = ops.steer_hidden(*args).double()
            err = ((ref - exact_steer(*args)).abs().max() / ref.abs().max()).item()
            report.check(
                f"reference {str(dtype)[6:]} residual={with_residual}",
                err < {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype],
                rel_err_vs_equations=err,
            )


class ToyLayer(torch.nn.Module):
    """A decoder layer's compute at given shapes: the q/k/v, o, gate/up and down projections as matmuls,
    two RMSNorms and the SiLU gate; attention is left out (the q slice stands in for its output).
    Returns (hidden, residual) like vLLM's Qwen2/Llama layers, steered by `unlock::steer` when asked."""

    def __init__(self, shapes: dict, dtype, device, steered: bool) -> None:
        super().__init__()
        d, q, kv, inter = shapes["hidden"], shapes["q"], shapes["kv"], shapes["intermediate"]

        def weight(fan_in, fan_out):
            return torch.nn.Parameter(
                torch.randn(fan_in, fan_out, device=device, dtype=dtype) / fan_in**0.5, requires_grad=False
            )

        self.q = q
        self.qkv, self.o = weight(d, q + 2 * kv), weight(q, d)
        self.gate_up, self.down = weight(d, 2 * inter), weight(inter, d)
        self.steered = steered

    @staticmethod
    def rms_norm(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    def forward(self, hidden, residual, *tables):
        residual = hidden + residual  # [T, d]
        attn = (self.rms_norm(residual) @ self.qkv)[:, : self.q]  # [T, q]
        residual = attn @ self.o + residual  # [T, d]
        gate, up = (self.rms_norm(residual) @ self.gate_up).chunk(2, dim=-1)  # 2 x [T, inter]
        hidden = (torch.nn.functional.silu(gate) * up) @ self.down  # [T, d]
        if self.steered:
            hidden = torch.ops.unlock.steer(hidden, residual, *tables)
        return hidden, residual


def capture(fn, repeats: int = 1):
    """A CUDA graph of `repeats` back-to-back calls of fn() (warmed up on a side stream), and its output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            out = fn()
    return graph, out


def check_graphs(report: Report, layers: dict, shapes: dict, dtype, device) -> None:
    """(c): compiled layer with the op, captured once, replayed after in-place writes == eager."""
    generator = torch.Generator().manual_seed(2)
    d = shapes["hidden"]
    for num_tokens in (1, 64):
        tables = make_tables(d, device, dtype, generator)
        token_row = make_rows(num_tokens, "mixed", device, generator)
        hidden = torch.randn(num_tokens, d, device=device, dtype=dtype)
        residual = torch.randn(num_tokens, d, device=device, dtype=dtype) * 4
        args = (hidden, residual, *tables, token_row)
        layer_graph, (layer_out, _) = capture(lambda args=args: layers["compiled_steered"](*args))
        op_graph, op_out = capture(lambda args=args: steer(*args))
        for round_ in range(3):
            # New per-step data written in place, as the runner does before each forward.
            token_row.copy_(make_rows(num_tokens, ("add", "mixed", "rotate_all")[round_], device, generator))
            tables[3][1, 0] = 0.1 * (round_ + 1)  # a term row edited in place, as an admission does
            hidden.copy_(torch.randn(num_tokens, d, generator=generator).to(device, dtype))
            layer_graph.replay()
            op_graph.replay()
            eager_op = triton_steer.steer_triton(*args)
            compiled_out, _ = layers["compiled_steered"](*args)
            eager_out, _ = layers["eager_steered"](*args)
            ref_out = ops.steer_hidden(*args)
            scale = eager_out.float().abs().max().item()
            layer_err = (layer_out.float() - eager_out.float()).abs().max().item() / scale
            op_err = (
                op_out.float() - ref_out.float()
            ).abs().max().item() / ref_out.float().abs().max().item()
            op_bitwise = torch.equal(bits(op_out), bits(eager_op))
            # The layer's replay need not match its un-graphed call bit for bit (cuBLAS may pick other
            # kernels under capture), so only the op is held to bits; the layer to a bf16 tolerance.
            report.check(
                f"graph replay T={num_tokens} round={round_}",
                op_bitwise and op_err <= 1.6e-2 and layer_err < 2e-2,
                op_replay_bitwise_eq_eager=op_bitwise,
                op_replay_rel_err_vs_ref=op_err,
                layer_replay_bitwise_eq_compiled=torch.equal(bits(layer_out), bits(compiled_out)),
                layer_replay_rel_err_vs_eager=layer_err,
            )
        del layer_graph, op_graph


def measure_us(fn, device, repeats: int, replays: int, graphed: bool = True) -> float:
    """Microseconds per call of fn: CUDA-graph replay of `repeats` calls timed with CUDA events; on CPU
    (dry run) a wall-clock loop. graphed=False times eager calls between the events, for code that cannot be
    captured (the torch-ops reference syncs the host: `nonzero` has a data-dependent shape)."""
    if not graphed and device != "cpu":
        fn()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(repeats * replays):
            fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) * 1e3 / (replays * repeats)
    if device == "cpu":
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e6
    graph, _ = capture(fn, repeats)
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return begin.elapsed_time(end) * 1e3 / (replays * repeats)


def time_all(
    report: Report, layers: dict, shapes: dict, dtype, device, token_counts, deadline: float
) -> None:
    """(d): the cost of one steered layer, kernel alone and inside the toy layer."""
    generator = torch.Generator().manual_seed(3)
    d = shapes["hidden"]
    tables = make_tables(d, device, dtype, generator)
    for num_tokens in token_counts:
        if time.monotonic() > deadline:
            report.say(f"timing stopped before T={num_tokens}: past the {TIME_BUDGET_S} s budget")
            break
        hidden = torch.randn(num_tokens, d, device=device, dtype=dtype)
        residual = torch.randn(num_tokens, d, device=device, dtype=dtype) * 4
        row = {"tokens": num_tokens}
        op_repeats = 20
        for pattern in PATTERNS:
            args = (hidden, residual, *tables, make_rows(num_tokens, pattern, device, generator))
            row[f"kernel_{pattern}_us"] = measure_us(lambda args=args: steer(*args), device, op_repeats, 10)
        args = (hidden, residual, *tables, make_rows(num_tokens, "mixed", device, generator))
        row["torch_ops_mixed_us"] = measure_us(  # eager: it cannot be captured
            lambda args=args: ops.steer_hidden(*args), device, op_repeats, 10, graphed=False
        )
        layer_repeats = 10 if num_tokens <= 512 else 3
        for name in ("compiled_plain", "compiled_steered"):
            row[f"layer_{name}_us"] = measure_us(
                lambda n=name, a=args: layers[n](*a), device, layer_repeats, 5
            )
        plain = row["layer_compiled_plain_us"]
        row["layer_overhead_pct"] = 100 * (row["layer_compiled_steered_us"] - plain) / plain
        for pattern in PATTERNS:
            row[f"kernel_{pattern}_pct_of_layer"] = 100 * row[f"kernel_{pattern}_us"] / plain
        if device != "cpu" and num_tokens <= GOAL_MAX_TOKENS:
            worst = max(PATTERNS, key=lambda p: row[f"kernel_{p}_us"])
            report.check(
                f"T={num_tokens}: every term pattern costs at most {GOAL_PCT}% of the layer",
                row[f"kernel_{worst}_pct_of_layer"] <= GOAL_PCT,
                worst=worst,
                pct=round(row[f"kernel_{worst}_pct_of_layer"], 2),
            )
        row["torch_ops_mixed_pct_of_layer"] = 100 * row["torch_ops_mixed_us"] / plain
        report.timings.append(row)
        report.say(
            f"{num_tokens:>6} {row['kernel_none_us']:>9.1f} {row['kernel_add_us']:>9.1f} "
            f"{row['kernel_mixed_us']:>9.1f} {row['kernel_rotate_all_us']:>9.1f} "
            f"{row['kernel_ablate_all_us']:>9.1f} "
            f"{row['torch_ops_mixed_us']:>9.1f} "
            f"{plain:>10.1f} {row['layer_compiled_steered_us']:>10.1f} {row['layer_overhead_pct']:>8.2f}% "
            f"{row['kernel_mixed_pct_of_layer']:>7.2f}% {row['torch_ops_mixed_pct_of_layer']:>7.2f}%"
        )


def build_layers(shapes: dict, dtype, device, compile_backend: str) -> dict:
    plain = ToyLayer(shapes, dtype, device, steered=False)
    steered = ToyLayer(shapes, dtype, device, steered=True)
    steered.load_state_dict(plain.state_dict())  # same weights: the op is the only difference
    return {
        "eager_steered": steered,
        "compiled_plain": torch.compile(plain, backend=compile_backend),
        "compiled_steered": torch.compile(steered, backend=compile_backend),
    }


def check_compiled_cpu(report: Report, layers: dict, shapes: dict) -> None:
    """--dry-run: the op inside a compiled layer (CPU kernel = reference) gives the eager layer's output."""
    generator = torch.Generator().manual_seed(4)
    for num_tokens in (1, 5, 9):
        tables = make_tables(shapes["hidden"], "cpu", torch.float32, generator)
        hidden = torch.randn(num_tokens, shapes["hidden"], generator=generator)
        residual = torch.randn(num_tokens, shapes["hidden"], generator=generator)
        args = (hidden, residual, *tables, make_rows(num_tokens, "mixed", "cpu", generator))
        compiled, _ = layers["compiled_steered"](*args)
        eager, _ = layers["eager_steered"](*args)
        err = (compiled - eager).abs().max().item()
        report.check(f"compiled layer with op (cpu) T={num_tokens}", err < 1e-4, abs_err_vs_eager=err)


def check_staging(report: Report, device) -> None:
    """(e) Steps written while the stream is stalled: each consumer reads its own step's per-token rows and
    the term row its admission changed."""
    size, steps, rows = 4096, 8, 16
    want = torch.tensor([[k + 1, k + 1] for k in range(steps)], device=device)
    token_row = torch.zeros(size, dtype=torch.int64, device=device)
    terms = (
        torch.zeros(rows, 4, dtype=torch.int64, device=device),
        torch.zeros(rows, 4, dtype=torch.float32, device=device),
        torch.zeros(rows, 4, dtype=torch.int64, device=device),
    )
    host_terms = (
        np.zeros((rows, 4), np.int64),
        np.zeros((rows, 4), np.float32),
        np.zeros((rows, 4), np.int64),
    )

    def run(host, stage_rows, upload) -> int:
        """Wrong steps when the host writes `steps` steps ahead of a stalled GPU."""
        seen = torch.zeros(steps, 2, dtype=torch.int64, device=device)
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # the GPU is busy (~0.1 s) while the host lays out the steps
        for step in range(steps):
            host()[:] = step + 1
            host_terms[1][1, 0] = step + 1  # an admission edits term row 1
            stage_rows([1], host_terms)
            upload()
            seen[step, 0] = token_row.sum() // size  # this step's consumer, in stream order
            seen[step, 1] = terms[1][1, 0].to(torch.int64)
        torch.cuda.synchronize()
        return int((seen != want).any(-1).sum())

    ring = staging.Staging(token_row, terms)
    wrong = run(ring.host, ring.stage_rows, ring.upload)
    report.check("staging: every step reads its own rows", wrong == 0, wrong_steps=wrong)

    # The same without the ring's events: one pinned buffer rewritten while its copies wait in the stream.
    pinned = torch.zeros(size, dtype=torch.int64, pin_memory=True)
    pinned_terms = torch.zeros(rows, 4, dtype=torch.float32, pin_memory=True)

    def stage_unguarded(changed, host) -> None:
        pinned_terms.numpy()[changed] = host[1][changed]

    def upload_unguarded() -> None:
        token_row.copy_(pinned, non_blocking=True)
        terms[1].copy_(pinned_terms, non_blocking=True)

    unguarded = run(pinned.numpy, stage_unguarded, upload_unguarded)
    report.say(f"staging without events (one buffer): {unguarded}/{steps} steps read another step's rows")


def stage(report: Report, name: str, fn, *args) -> None:
    """Run one part; an exception becomes a failed check with its traceback, so later parts still run and
    the results are still written (a GPU run is one shot)."""
    try:
        fn(*args)
    except Exception:
        report.check(f"{name} raised", False)
        report.say(traceback.format_exc())


def device_slug(device) -> str:
    name = torch.cuda.get_device_name(device) if device != "cpu" else f"cpu-dry-run-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU only: reference path, op, compile, report"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default $OUT or bench/gpu/results)"
    )
    cli = parser.parse_args()
    started = time.monotonic()
    report = Report()
    if not cli.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run for the CPU-side checks")
    device = "cpu" if cli.dry_run else "cuda"
    dtype = torch.float32 if cli.dry_run else torch.bfloat16
    shapes = TINY if cli.dry_run else QWEN7B
    torch.manual_seed(0)
    report.say(
        f"device={device_slug(device)} torch={torch.__version__} "
        f"triton={getattr(triton_steer.triton, '__version__', None)} dtype={dtype} shapes={shapes}"
    )

    with torch.no_grad():
        if cli.dry_run:
            stage(report, "reference", check_reference, report)
            stage(
                report,
                "kernel",
                check_kernel,
                report,
                steer,
                device,
                (torch.float32, torch.bfloat16),
                (1, 7),
                (96, 100),
            )
            layers = build_layers(shapes, dtype, device, compile_backend="aot_eager")
            stage(report, "compiled", check_compiled_cpu, report, layers, shapes)
            token_counts = (1, 8, 64)
        else:
            stage(
                report,
                "kernel",
                check_kernel,
                report,
                steer,
                device,
                (torch.float32, torch.bfloat16),
                (1, 7, 300),
                (3584, 896, 1000),
            )
            layers = build_layers(shapes, dtype, device, compile_backend="inductor")
            stage(report, "graphs", check_graphs, report, layers, shapes, dtype, device)
            stage(report, "staging", check_staging, report, device)
            token_counts = TOKEN_COUNTS
        report.say(f"checks done at {time.monotonic() - started:.0f} s")
        report.say(
            "\nmicroseconds per steered layer (CUDA-graph replay; kernel: term rows none, add, mixed, "
            "rotate_all, ablate_all)\n"
            f"{'T':>6} {'k_none':>9} {'k_add':>9} {'k_mixed':>9} {'k_rot_all':>9} {'k_abl_all':>9} "
            f"{'torch_ops':>9} "
            f"{'layer':>10} {'layer+op':>10} {'overhead':>9} {'kernel%':>8} {'ops%':>8}"
        )
        stage(
            report,
            "timings",
            time_all,
            report,
            layers,
            shapes,
            dtype,
            device,
            token_counts,
            started + TIME_BUDGET_S,
        )

    elapsed = time.monotonic() - started
    report.say(
        f"\n{len(report.checks) - len(report.failed)}/{len(report.checks)} checks passed in {elapsed:.0f} s"
    )
    for name in report.failed:
        report.say(f"FAILED: {name}")
    out_dir = cli.out or Path(os.environ.get("OUT") or REPO / "bench" / "gpu" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "triton": getattr(triton_steer.triton, "__version__", None),
        "dtype": str(dtype),
        "shapes": shapes,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": elapsed,
        "checks": report.checks,
        "timings_us": report.timings,
    }
    (out_dir / f"{slug}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{slug}.txt").write_text("\n".join(report.lines) + "\n")
    print(f"wrote {out_dir / slug}.json and .txt")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
