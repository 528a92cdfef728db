"""Every Triton kernel of the project, compiled ahead of time to a cubin for the GPU targets, on a machine
without a GPU.

Why this exists: the CPU suite runs the kernels in Triton's interpreter (TRITON_INTERPRET=1), which does not
apply the compiler's rules. A kernel that read a plain global int passed every interpreter test and did not
compile on an H200 (issue 27): the server would not have started on the GPU image. `triton.compile` with a
`GPUTarget` runs the whole compiler (front end, TTGIR, LLVM, ptxas) without a device, so compile errors show
here. It also asks ptxas how many registers a program uses: the kernel keeps a token's row in registers, and
a spill would turn that into local-memory traffic. `scripts/check-vllm-0.33.sh` runs this file again with the
Triton of the vllm 0.33 wheel (the GPU image's).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import triton  # a dependency of vLLM (CPU and GPU wheels): missing, this file fails to import, loudly
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nvidia
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from unlock_vllm import triton_steer
from unlock_vllm.request import MAX_SELECTED

ARCHS = (80, 90)  # A100 and H100/H200: the targets of the GPU image
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}  # what the engine passes
HIDDEN_SIZES = (64, 896, 3584, 8192)  # check_cuda_kernel's rows, Qwen2.5 0.5B, 7B, a 70B
# Pointer arguments of `_steer_kernel` that do not take the hidden's dtype (the engine's tables).
TABLE_TYPES = {
    "gate_ptr": "*fp32",
    "cap_ptr": "*i64",
    "strength_ptr": "*fp32",
    "op_ptr": "*i64",
    "token_row_ptr": "*i64",
}
# JIT functions that are not kernels of their own: compiled as part of the kernels that call them.
HELPERS = {"_term"}


def steer_variants() -> list[tuple[int, str, bool, int, int]]:
    """(arch, dtype, residual, terms, hidden): every dtype with and without a residual at the engine's term
    width, for each launch configuration; every term count a table can have, in bfloat16."""
    variants = [
        (arch, dtype, residual, MAX_SELECTED, hidden)
        for arch in ARCHS
        for dtype in DTYPES.values()
        for residual in (True, False)
        for hidden in HIDDEN_SIZES
    ]
    variants += [(arch, "bf16", True, terms, 3584) for arch in ARCHS for terms in range(1, MAX_SELECTED)]
    return variants


def compile_steer(arch: int, dtype: str, residual: bool, terms: int, hidden: int):
    kernel = triton_steer._steer_kernel
    block, num_warps = triton_steer.launch_config(hidden)
    constexprs = {"NUM_TERMS": terms, "HAS_RESIDUAL": residual, "BLOCK": block}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = TABLE_TYPES.get(name, f"*{dtype}")
        else:
            signature[name] = "i32"  # sizes and strides: the launcher passes ints below 2**31 as i32
    source = ASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def ptxas_report(ptx: str, arch: int, tmp_path: Path) -> dict[str, int]:
    """Registers per thread and spill bytes, as ptxas itself reports them for this PTX."""
    source = tmp_path / f"kernel_sm{arch}.ptx"
    source.write_text(ptx)
    suffix = "a" if arch == 90 else ""  # Triton targets sm_90a on Hopper
    proc = subprocess.run(
        [nvidia.get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(source), "-o", "/dev/null"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = {
        key: [int(n) for n in re.findall(pattern, proc.stderr + proc.stdout)]
        for key, pattern in {
            "registers": r"Used (\d+) registers",
            "spill_stores": r"(\d+) bytes spill stores",
            "spill_loads": r"(\d+) bytes spill loads",
        }.items()
    }
    assert all(len(v) == 1 for v in found.values()), proc.stderr
    return {key: v[0] for key, v in found.items()}


def test_every_triton_kernel_of_the_project_is_covered():
    """A new kernel must get its variants here: otherwise it would be checked only in the interpreter."""
    root = Path(__file__).parents[2]
    sources = [root / top for top in ("unlock", "patches", "server", "clients", "bench")]
    with_kernels = {
        str(path.relative_to(root))
        for top in sources
        for path in top.rglob("*.py")
        if "@triton.jit" in path.read_text()
    }
    assert with_kernels == {"patches/unlock_vllm/triton_steer.py"}, with_kernels
    jitted = {name for name, obj in vars(triton_steer).items() if isinstance(obj, JITFunction)}
    assert jitted - HELPERS == {"_steer_kernel"}, jitted


@pytest.mark.parametrize("arch", ARCHS)
def test_the_steering_kernel_compiles_for_every_engine_variant(arch):
    compiled = [v for v in steer_variants() if v[0] == arch]
    for variant in compiled:
        kernel = compile_steer(*variant)
        assert len(kernel.asm["cubin"]) > 0, variant
        assert kernel.metadata.num_warps == triton_steer.launch_config(variant[-1])[1], variant
    assert len(compiled) == len(DTYPES) * 2 * len(HIDDEN_SIZES) + MAX_SELECTED - 1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hidden", [896, 3584, 8192])
def test_the_row_stays_in_registers(arch, hidden, tmp_path):
    """Up to a 70B's hidden size, no variant spills: the row is read once, from registers."""
    for dtype in ("bf16", "fp32"):
        kernel = compile_steer(arch, dtype, True, MAX_SELECTED, hidden)
        report = ptxas_report(kernel.asm["ptx"], arch, tmp_path)
        assert report["spill_stores"] == report["spill_loads"] == 0, (arch, hidden, dtype, report)


def test_a_compile_error_is_reported_as_one(tmp_path):
    """What failed the GPU start before: a kernel reading a plain global. The AOT compile raises Triton's
    CompilationError, and the start-up check names it as a compile error, with the real exception first."""
    from unlock_vllm.steer_op import kernel_failure

    module = tmp_path / "bad_kernel.py"
    module.write_text(
        "import triton\nimport triton.language as tl\nCODE = 1\n\n\n@triton.jit\n"
        "def bad(x_ptr):\n    tl.store(x_ptr, tl.load(x_ptr) + CODE)\n"
    )
    import importlib.util

    spec = importlib.util.spec_from_file_location("bad_kernel", module)
    bad = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bad)
    with pytest.raises(triton.compiler.errors.CompilationError) as caught:
        triton.compile(ASTSource(bad.bad, {"x_ptr": "*fp32"}), target=GPUTarget("cuda", 90, 32))
    message = kernel_failure(torch.device("cuda", 0), caught.value)
    assert message.startswith("unlock: Triton could not compile the fused steering kernel for cuda:0")
    assert "Cannot access global variable CODE" in message
    assert "C compiler" not in message
    other = kernel_failure(torch.device("cuda", 0), RuntimeError("Failed to find C compiler"))
    assert "RuntimeError: Failed to find C compiler" in other and "compile the fused" not in other


def test_the_kernel_uses_the_operator_codes_of_unlock_ops():
    from unlock.ops import OPERATORS

    assert triton_steer.OPERATOR_CODES == {name: op.code for name, op in OPERATORS.items()}
