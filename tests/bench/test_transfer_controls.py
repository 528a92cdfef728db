"""The transfer experiment's mean-axis control is built with the settings it claims
(bench/transfer/control_args.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "transfer"))
from control_args import mean_axis_args  # noqa: E402

CANDIDATE = [
    "--align-positions", "all", "--align-data", "texts.jsonl", "--center", "--rank", "full",
    "--ridge", "0.1,0.3,1", "--select-layers", "4",
]  # fmt: skip


def test_the_mean_axis_control_is_the_uncentred_rank_1_map_on_the_candidate_s_rows():
    args = mean_axis_args(CANDIDATE, [3, 4, 5])
    # `unlock align` centres by default: the control must say --no-center, and keep no --center of the
    # candidate's (a centred rank-1 map is not the mean axis; an earlier version built that).
    assert "--no-center" in args and "--center" not in args
    assert args[args.index("--rank") + 1] == "1" and args.count("--rank") == 1
    assert args[args.index("--ridge") + 1] == "0" and args.count("--ridge") == 1
    assert args[args.index("--layers") + 1] == "3,4,5"
    assert "--select-layers" not in args
    assert args[:4] == ["--align-positions", "all", "--align-data", "texts.jsonl"]


def test_an_uncentred_candidate_gives_one_no_center():
    args = mean_axis_args(["--no-center", "--rank", "16"], [0])
    assert args.count("--no-center") == 1 and "16" not in args
