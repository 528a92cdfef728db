"""The engine's GPU-only code, checked as far as a CPU allows (docs/patch.md lists what only a GPU checks).

1. The op's CUDA kernel path (`steer_op._steer_cuda`, the fused Triton launch) never syncs the host: under
   CUDA-graph capture a sync is an error (`operation not permitted when stream is capturing`), and outside it
   a stall per layer. Run on `meta` tensors, which have shapes and no data, any data-dependent op (`nonzero`,
   `.item()`, `.tolist()`, a boolean-mask index, `unique`) fails; the aten ops it dispatches are recorded too.
   The reference math `unlock.ops.steer_hidden`, which does sync (it runs on CPU only), is the detector's
   control.
2. The staging of a step's rows in host buffers copied to the device, run with CPU tensors standing in for
   the device ones: what the device tables hold after each upload, over the ring of buffers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from unlock_vllm import steer_op, triton_steer
from unlock_vllm.request import MAX_SELECTED
from unlock_vllm.staging import Staging

from unlock.ops import steer_hidden

SYNCING = {"nonzero", "_local_scalar_dense", "item", "masked_select", "unique", "_unique2", "equal"}


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def meta_step(num_tokens: int = 24, hidden: int = 3584, dtype=torch.bfloat16) -> tuple[torch.Tensor, ...]:
    """A layer's arguments as the engine passes them, on the meta device."""
    meta = torch.device("meta")
    rows = 1 + 3 * 16
    return (
        torch.empty(num_tokens, hidden, dtype=dtype, device=meta),
        torch.empty(num_tokens, hidden, dtype=dtype, device=meta),
        torch.empty(9, hidden, dtype=dtype, device=meta),
        torch.empty(9, dtype=torch.float32, device=meta),
        torch.empty(rows, MAX_SELECTED, dtype=torch.int64, device=meta),
        torch.empty(rows, MAX_SELECTED, dtype=torch.float32, device=meta),
        torch.empty(rows, MAX_SELECTED, dtype=torch.int64, device=meta),
        torch.empty(512, dtype=torch.int64, device=meta),
    )


def run_recorded(fn, args) -> tuple[list[str], BaseException | None]:
    recorder = RecordOps()
    try:
        with recorder:
            fn(*args)
    except Exception as exc:  # a data-dependent op on meta tensors
        return recorder.ops, exc
    return recorder.ops, None


def test_the_cuda_kernel_path_never_syncs_the_host(monkeypatch):
    launches = []

    class Launch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs))

    monkeypatch.setattr(triton_steer, "_steer_kernel", Launch())
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets steer_triton's device check accept non-CUDA tensors
    for residual in (True, False):
        args = list(meta_step())
        if not residual:
            args[1] = None
        ops, error = run_recorded(steer_op._steer_cuda, args)
        assert error is None, f"the CUDA path needs data on the host: {error!r}"
        assert not SYNCING & set(ops), ops
        assert ops == ["empty"], ops  # the output buffer; everything else is in the one launch
    assert [grid for grid, _ in launches] == [(24,), (24,)]
    assert launches[0][1]["HAS_RESIDUAL"] and not launches[1][1]["HAS_RESIDUAL"]


def test_the_detector_catches_a_host_sync():
    """The control: the CPU reference math branches on the indices, and the same harness says so."""
    ops, error = run_recorded(steer_hidden, meta_step())
    assert error is not None or SYNCING & set(ops), ops
    assert "nonzero" in ops


def _tables(rows: int = 7, width: int = 4) -> tuple[torch.Tensor, ...]:
    return (
        torch.zeros(rows, width, dtype=torch.int64),
        torch.zeros(rows, width, dtype=torch.float32),
        torch.zeros(rows, width, dtype=torch.int64),
    )


@pytest.mark.parametrize("ring", [1, 3])
def test_staged_copies_reach_the_device_tables(ring):
    """The GPU's staging path (host buffers, copies, a scatter of the changed term rows), with CPU tensors as
    the device's: after each upload the device holds that step's rows and only the changed term rows moved."""
    token_row = torch.zeros(16, dtype=torch.int64)
    device_terms = _tables()
    staging = Staging(token_row, device_terms, ring=ring, copies=True)
    host_terms = tuple(t.numpy().copy() for t in _tables())
    expected = [t.clone() for t in device_terms]
    rng = np.random.default_rng(0)
    for step in range(7):
        rows = sorted(rng.choice(np.arange(1, 7), size=step % 3, replace=False).tolist())
        for table in host_terms:
            table[rows] = rng.integers(1, 9, size=(len(rows), table.shape[1]))
        host = staging.host()
        assert host.ctypes.data != token_row.data_ptr()  # a host buffer, not the device tensor
        layout = rng.integers(0, 7, size=16)
        host[:] = layout
        staging.stage_rows(rows, host_terms)
        staging.upload()
        assert token_row.tolist() == layout.tolist(), step
        for device, want, table in zip(device_terms, expected, host_terms, strict=True):
            want[rows] = torch.from_numpy(table[rows]).to(want.dtype)
            assert torch.equal(device, want), step
