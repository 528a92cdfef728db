"""The `engine` marker and its guard. The fast tier (`pytest -m "not engine"`) must start no vLLM engine or
server, so every test that starts one carries the marker (listed in `ENGINE_TESTS`, or its module's own
`pytestmark = pytest.mark.engine`). A test without it fails the moment it launches one (`subprocess.Popen`
is guarded while it runs) or leaves an engine core running under pytest, so a forgotten marker fails the
full run too, not only the fast tier."""

from __future__ import annotations

import fnmatch
import os
import subprocess
from collections.abc import Sequence

import psutil
import pytest

# Tests that start vLLM: an engine (tests/patches engine jobs), an `unlock-serve` process, or vLLM's start-up
# path in a process of its own. Patterns of pytest node ids, relative to the repository root.
ENGINE_TESTS = (
    "tests/patches/test_engine_*.py::*",
    "tests/hardening/test_*.py::*",
    "tests/clients/test_client.py::*",
    "tests/server/test_capabilities.py::*",
    "tests/server/test_data_parallel.py::*",
    "tests/server/test_default_model.py::*",
    "tests/server/test_inference.py::*",
    "tests/server/test_playground_browser.py::*",
    "tests/server/test_replicas.py::*",
    "tests/server/test_start_refusals.py::test_kv_sharing_fast_prefill_is_refused_before_the_engine_starts",
    # vLLM's plugin loading in a fresh process: no engine, but vLLM's start-up (and 15 s of the fast tier)
    "tests/patches/test_seams.py::test_plugin_registration_wraps_every_seam_and_sets_no_environment",
)
# What a launched command line contains when it starts an engine or a server.
LAUNCHERS = ("unlock_server.cli", "unlock-serve", "engine_job.py")


def is_engine_test(nodeid: str) -> bool:
    return any(fnmatch.fnmatchcase(nodeid, pattern) for pattern in ENGINE_TESTS)


def _launches_engine(args: str | bytes | Sequence) -> bool:
    argv = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
    text = " ".join(os.fsdecode(a) if isinstance(a, bytes | os.PathLike) else str(a) for a in argv)
    return any(launcher in text for launcher in LAUNCHERS) or os.path.basename(str(argv[0])) == "vllm"


def _engine_cores() -> list[int]:
    cores = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                cores.append(child.pid)
        except psutil.Error:
            continue
    return cores


def _fail(nodeid: str, what: str) -> None:
    pytest.fail(
        f"{nodeid} {what} but is not marked `engine`: add it to ENGINE_TESTS in tests/engine_guard.py (or "
        "mark its module) so that the fast tier (-m 'not engine') deselects it",
        pytrace=False,
    )


_ORIGINAL_POPEN = subprocess.Popen
_cores_before: set[int] = set()  # engine cores already running when the guarded test started


def install(nodeid: str) -> None:
    """Guard `subprocess.Popen` (what `subprocess.run` and the test launchers use) while `nodeid` runs."""
    global _cores_before
    _cores_before = set(_engine_cores())  # an earlier engine test's leftovers are not this test's doing

    class GuardedPopen(_ORIGINAL_POPEN):  # a subclass: isinstance checks on Popen objects keep working
        def __init__(self, args, *rest, **kwargs):
            if _launches_engine(args):
                _fail(nodeid, f"launches {args!r}")
            super().__init__(args, *rest, **kwargs)

    subprocess.Popen = GuardedPopen


def uninstall() -> None:
    subprocess.Popen = _ORIGINAL_POPEN


def check_no_engine_core(nodeid: str) -> None:
    """An engine started in this process (not through Popen) shows as a VLLM::EngineCore child."""
    cores = sorted(set(_engine_cores()) - _cores_before)
    if cores:
        _fail(nodeid, f"left vLLM engine cores running (pids {cores})")
