"""GPU check of the fused steering kernel: correctness, torch.compile + CUDA graphs, cost per steered layer.

Self-contained on purpose (torch + Triton only; our two files loaded by path), so it runs on a bare GPU
machine without vLLM or transformers:
  (a) registers `steer_triton` as the CUDA kernel of a torch custom op `unlock::steer` with a fake impl, the
      way `unlock_vllm.steer_op` does;
  (b) checks it against `unlock.ops.steer_hidden` (float32 and bfloat16, with and without a residual): rotated
      rows within tolerance (also against a float64 reference), add-only rows bit-identical to the reference,
      untouched rows bit-identical to the input;
  (c) runs the op inside a torch.compile'd toy decoder layer (Qwen2.5-7B shapes: the four projections as
      matmuls, RMSNorm, SiLU gate; attention left out) and under CUDA-graph capture; writes new indices and
      inputs in place between replays and checks replay == eager;
  (e) the host-to-device staging of the per-step indices with the host running ahead of the GPU (as under
      asynchronous scheduling): the stream is stalled, several steps are written and uploaded, and each
      step's consumer must read its own indices; a single staging buffer is run too, to show the race exists;
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

import torch

REPO = Path(__file__).resolve().parents[2]
TOKEN_COUNTS = (1, 8, 64, 512, 8192)
# Qwen2.5-7B: hidden 3584, 28 query heads and 4 KV heads of 128, MLP 18944.
QWEN7B = {"hidden": 3584, "q": 28 * 128, "kv": 4 * 128, "intermediate": 18944}
TINY = {"hidden": 96, "q": 96, "kv": 32, "intermediate": 192}
NUM_ROWS = 9  # table rows, row 0 = "not steered"
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
    add_table: torch.Tensor,
    rot_table: torch.Tensor,
    add_index: torch.Tensor,
    rot_index: torch.Tensor,
) -> torch.Tensor:
    return ops.steer_hidden(hidden, residual, add_table, rot_table, add_index, rot_index)


@steer.register_fake
def _steer_fake(hidden, residual, add_table, rot_table, add_index, rot_index):
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


def make_tables(hidden_size: int, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [NUM_ROWS, d] tables like compose_rows makes: add rows raw, rotate rows a * unit, row 0 = 0."""
    add = torch.randn(NUM_ROWS, hidden_size, generator=generator) * 0.05
    rot = torch.randn(NUM_ROWS, hidden_size, generator=generator)
    rot = rot / rot.norm(dim=-1, keepdim=True) * torch.linspace(0.05, 0.8, NUM_ROWS).unsqueeze(-1)
    add[0] = 0
    rot[0] = 0
    return add.to(device), rot.to(device)


def make_indices(num_tokens: int, pattern: str, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 index buffers longer than T (the tail is junk the op must ignore), for a steering pattern.

    none: nothing steered; add: every token gets an add row; mixed: random add rows (some 0) and every 8th
    token rotated (a batch of requests at their last prompt token); rotate_all: every token rotated.
    """
    length = num_tokens + 13
    add = torch.randint(0, NUM_ROWS, (length,), generator=generator)
    rot = torch.zeros(length, dtype=torch.int64)
    if pattern == "none":
        add.zero_()
    elif pattern == "add":
        add = torch.arange(length) % (NUM_ROWS - 1) + 1
    elif pattern == "mixed":
        rot[::8] = torch.randint(1, NUM_ROWS, (len(rot[::8]),), generator=generator)
    elif pattern == "rotate_all":
        rot = torch.randint(1, NUM_ROWS, (length,), generator=generator)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    add[num_tokens:] = NUM_ROWS - 1  # junk past T: steering it would show up as a mismatch
    rot[num_tokens:] = NUM_ROWS - 1
    return add.to(device), rot.to(device)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 vs 0.0 and NaN payloads count as differences."""
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


def exact_steer(hidden, residual, add_table, rot_table, add_index, rot_index) -> torch.Tensor:
    """DESIGN's equations in float64 with no intermediate rounding: an independent reading of steer_hidden.

    (steer_hidden itself computes in float32 whatever its inputs, so it cannot serve as the exact answer.)
    """
    num_tokens = hidden.shape[0]
    res = 0 if residual is None else residual.double()
    added = hidden.double() + add_table[add_index[:num_tokens]].to(hidden.dtype).double()  # [T, d]
    stream = added + res
    norm = stream.norm(dim=-1, keepdim=True)  # [T, 1]
    u = stream / norm + rot_table[rot_index[:num_tokens]].double()
    rotated = norm * u / u.norm(dim=-1, keepdim=True) - res
    return torch.where((rot_index[:num_tokens] > 0).unsqueeze(-1), rotated, added)


def check_kernel(
    report: Report, impl, device, dtypes, token_counts, hidden_sizes, signed_zeros: bool
) -> None:
    """(b): `impl` (the op) against steer_hidden in the same dtype and against float64 math.

    signed_zeros puts -0.0 into every row: the kernel copies untouched rows bit for bit, while the reference
    adds the zero row (-0.0 + 0.0 = +0.0, value-equal but not bit-equal), so the dry run leaves them out.
    """
    generator = torch.Generator().manual_seed(0)
    tolerance = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}  # relative to the row's largest |value|
    for dtype in dtypes:
        for hidden_size in hidden_sizes:
            for num_tokens in token_counts:
                for with_residual in (True, False):
                    add_table, rot_table = make_tables(hidden_size, device, generator)
                    add_index, rot_index = make_indices(num_tokens, "mixed", device, generator)
                    rot_index[: min(3, num_tokens)] = 1  # rotated rows even when T is 1
                    add_index[1:num_tokens:5] = 0  # rotated rows without an add row, too
                    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(device, dtype)
                    if signed_zeros:
                        hidden[:, 0] = -0.0  # must survive untouched rows
                    residual = (torch.randn(num_tokens, hidden_size, generator=generator) * 4).to(
                        device, dtype
                    )
                    residual = residual if with_residual else None
                    args = (hidden, residual, add_table, rot_table, add_index, rot_index)
                    out = impl(*args)
                    ref = ops.steer_hidden(*args)
                    exact = exact_steer(*args)
                    rotated = rot_index[:num_tokens] > 0
                    add_only = ~rotated & (add_index[:num_tokens] > 0)
                    untouched = ~rotated & (add_index[:num_tokens] == 0)
                    scale = ref.float().abs().amax(dim=-1, keepdim=True)
                    err_ref = ((out.float() - ref.float()).abs() / scale)[rotated].max().item()
                    err_exact = ((out.double() - exact).abs() / scale)[rotated].max().item()
                    ref_err_exact = ((ref.double() - exact).abs() / scale)[rotated].max().item()
                    ok = (
                        err_ref <= tolerance[dtype]
                        and err_exact <= max(2 * ref_err_exact, tolerance[dtype])
                        and torch.equal(bits(out[add_only]), bits(ref[add_only]))
                        and torch.equal(bits(out[untouched]), bits(hidden[untouched]))
                        and out.dtype == hidden.dtype
                    )
                    report.check(
                        f"kernel {str(dtype)[6:]} d={hidden_size} T={num_tokens} residual={with_residual}",
                        ok,
                        rotated_rel_err_vs_ref=err_ref,
                        rotated_rel_err_vs_f64=err_exact,
                        ref_rel_err_vs_f64=ref_err_exact,
                        add_only_rows=int(add_only.sum()),
                        untouched_rows=int(untouched.sum()),
                    )


def check_reference(report: Report) -> None:
    """--dry-run: steer_hidden against the float64 equations (CPU)."""
    generator = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for with_residual in (True, False):
            add_table, rot_table = make_tables(48, "cpu", generator)
            add_index, rot_index = make_indices(11, "mixed", "cpu", generator)
            rot_index[:3] = torch.tensor([2, 0, 5])
            hidden = torch.randn(11, 48, generator=generator).to(dtype)
            residual = (torch.randn(11, 48, generator=generator) * 4).to(dtype) if with_residual else None
            args = (hidden, residual, add_table, rot_table, add_index, rot_index)
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

    def forward(self, hidden, residual, add_table, rot_table, add_index, rot_index):
        residual = hidden + residual  # [T, d]
        attn = (self.rms_norm(residual) @ self.qkv)[:, : self.q]  # [T, q]
        residual = attn @ self.o + residual  # [T, d]
        gate, up = (self.rms_norm(residual) @ self.gate_up).chunk(2, dim=-1)  # 2 x [T, inter]
        hidden = (torch.nn.functional.silu(gate) * up) @ self.down  # [T, d]
        if self.steered:
            hidden = torch.ops.unlock.steer(hidden, residual, add_table, rot_table, add_index, rot_index)
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
        add_table, rot_table = make_tables(d, device, generator)
        add_index, rot_index = make_indices(num_tokens, "mixed", device, generator)
        hidden = torch.randn(num_tokens, d, device=device, dtype=dtype)
        residual = torch.randn(num_tokens, d, device=device, dtype=dtype) * 4
        args = (hidden, residual, add_table, rot_table, add_index, rot_index)
        layer_graph, (layer_out, _) = capture(lambda args=args: layers["compiled_steered"](*args))
        op_graph, op_out = capture(lambda args=args: steer(*args))
        for round_ in range(3):
            # New per-step data written in place, as the runner does before each forward.
            new_add, new_rot = make_indices(
                num_tokens, ("add", "mixed", "rotate_all")[round_], device, generator
            )
            add_index.copy_(new_add)
            rot_index.copy_(new_rot)
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


def measure_us(fn, device, repeats: int, replays: int) -> float:
    """Microseconds per call of fn: CUDA-graph replay of `repeats` calls timed with CUDA events; on CPU
    (dry run) a wall-clock loop."""
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
    add_table, rot_table = make_tables(d, device, generator)
    for num_tokens in token_counts:
        if time.monotonic() > deadline:
            report.say(f"timing stopped before T={num_tokens}: past the {TIME_BUDGET_S} s budget")
            break
        hidden = torch.randn(num_tokens, d, device=device, dtype=dtype)
        residual = torch.randn(num_tokens, d, device=device, dtype=dtype) * 4
        row = {"tokens": num_tokens}
        op_repeats = 20
        for pattern in ("none", "add", "mixed", "rotate_all"):
            add_index, rot_index = make_indices(num_tokens, pattern, device, generator)
            args = (hidden, residual, add_table, rot_table, add_index, rot_index)
            row[f"kernel_{pattern}_us"] = measure_us(lambda args=args: steer(*args), device, op_repeats, 10)
        add_index, rot_index = make_indices(num_tokens, "mixed", device, generator)
        args = (hidden, residual, add_table, rot_table, add_index, rot_index)
        row["torch_ops_mixed_us"] = measure_us(
            lambda args=args: ops.steer_hidden(*args), device, op_repeats, 10
        )
        layer_repeats = 10 if num_tokens <= 512 else 3
        for name in ("compiled_plain", "compiled_steered"):
            row[f"layer_{name}_us"] = measure_us(
                lambda n=name, a=args: layers[n](*a), device, layer_repeats, 5
            )
        plain = row["layer_compiled_plain_us"]
        row["layer_overhead_pct"] = 100 * (row["layer_compiled_steered_us"] - plain) / plain
        row["kernel_mixed_pct_of_layer"] = 100 * row["kernel_mixed_us"] / plain
        row["torch_ops_mixed_pct_of_layer"] = 100 * row["torch_ops_mixed_us"] / plain
        report.timings.append(row)
        report.say(
            f"{num_tokens:>6} {row['kernel_none_us']:>9.1f} {row['kernel_add_us']:>9.1f} "
            f"{row['kernel_mixed_us']:>9.1f} {row['kernel_rotate_all_us']:>9.1f} "
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
        add_table, rot_table = make_tables(shapes["hidden"], "cpu", generator)
        add_index, rot_index = make_indices(num_tokens, "mixed", "cpu", generator)
        hidden = torch.randn(num_tokens, shapes["hidden"], generator=generator)
        residual = torch.randn(num_tokens, shapes["hidden"], generator=generator)
        args = (hidden, residual, add_table, rot_table, add_index, rot_index)
        compiled, _ = layers["compiled_steered"](*args)
        eager, _ = layers["eager_steered"](*args)
        err = (compiled - eager).abs().max().item()
        report.check(f"compiled layer with op (cpu) T={num_tokens}", err < 1e-4, abs_err_vs_eager=err)


def check_staging(report: Report, device) -> None:
    """(e) Steps written while the stream is stalled: each consumer reads the indices of its own step."""
    size, steps = 4096, 8
    want = torch.tensor([[k + 1, -(k + 1)] for k in range(steps)], device=device)

    def run(host_pair, upload) -> int:
        """Wrong steps when the host writes `steps` steps ahead of a stalled GPU."""
        seen = torch.zeros(steps, 2, dtype=torch.int64, device=device)
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # the GPU is busy (~0.1 s) while the host lays out the steps
        for step in range(steps):
            add_host, rot_host = host_pair()
            add_host[:] = step + 1
            rot_host[:] = -(step + 1)
            upload()
            seen[step, 0] = add_index.sum() // size  # this step's consumer, in stream order
            seen[step, 1] = rot_index.sum() // size
        torch.cuda.synchronize()
        return int((seen != want).any(-1).sum())

    add_index = torch.zeros(size, dtype=torch.int64, device=device)
    rot_index = torch.zeros(size, dtype=torch.int64, device=device)
    ring = staging.Staging(add_index, rot_index)
    wrong = run(ring.host, ring.upload)
    report.check("staging: every step reads its own indices", wrong == 0, wrong_steps=wrong)

    # The same without the ring's events: one pinned buffer rewritten while its copies wait in the stream.
    add_pinned = torch.zeros(size, dtype=torch.int64, pin_memory=True)
    rot_pinned = torch.zeros(size, dtype=torch.int64, pin_memory=True)

    def upload_unguarded() -> None:
        add_index.copy_(add_pinned, non_blocking=True)
        rot_index.copy_(rot_pinned, non_blocking=True)

    unguarded = run(lambda: (add_pinned.numpy(), rot_pinned.numpy()), upload_unguarded)
    report.say(f"staging without events (one buffer): {unguarded}/{steps} steps read another step's indices")


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
                False,
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
                True,
            )
            layers = build_layers(shapes, dtype, device, compile_backend="inductor")
            stage(report, "graphs", check_graphs, report, layers, shapes, dtype, device)
            stage(report, "staging", check_staging, report, device)
            token_counts = TOKEN_COUNTS
        report.say(f"checks done at {time.monotonic() - started:.0f} s")
        report.say(
            "\nmicroseconds per steered layer (CUDA-graph replay; kernel: none/add/mixed/rotate_all rows)\n"
            f"{'T':>6} {'k_none':>9} {'k_add':>9} {'k_mixed':>9} {'k_rot_all':>9} {'torch_ops':>9} "
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
