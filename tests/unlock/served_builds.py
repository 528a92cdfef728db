"""`unlock build` of the tiny models as test_served.py and test_served_target.py run it: the same small
settings whether the target is a folder or a server, so that the two builds can be compared."""

from __future__ import annotations

from pathlib import Path

from unlock import Capability
from unlock.cli import main

DEMO = Path(__file__).resolve().parents[2] / "unlock" / "data" / "demo_questions.jsonl"
# What a capability records of its target: equal for a build through a server and one from the folder.
TARGET_KEYS = ("target_name", "target_architecture", "target_num_layers", "target_hidden_size",
               "target_config_sha256")  # fmt: skip


def build(out: Path, source: Path, *target: str) -> Capability:
    """Build a capability of `source` into `target` (`--target FOLDER` or `--target-url URL ...`)."""
    argv = ["build", "--source-locked", str(source), *target, "--data", str(DEMO), "-n", "16",
            "--rank", "8", "--ridge", "0.3", "--layers", "1-3", "--name", "cot", "-o", str(out),
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    return Capability.load(out)
