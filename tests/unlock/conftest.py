"""One torch thread for the unlock tests: the tiny models' matmuls are far faster without thread handoffs on
the 2-core CI machines (measured: ~10x on a loaded machine). Subprocesses get the same via OMP_NUM_THREADS."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    previous, previous_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(previous)
    if previous_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = previous_env
