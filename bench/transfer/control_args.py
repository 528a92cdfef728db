"""`unlock align` arguments of the transfer experiment's controls (kept apart from run.py, which needs the
bench extras, so that tests can check them with the test install alone)."""

from __future__ import annotations

# `unlock align` options a control replaces: it keeps the chosen candidate's rows, not its fit settings.
FIT_OPTIONS = {
    "--rank": 1, "--ridge": 1, "--select-layers": 1, "--layers": 1, "--center": 0, "--no-center": 0,
    "--store": 1,
}  # fmt: skip


def without_fit_options(align_args: list[str]) -> list[str]:
    """A candidate's `unlock align` arguments less its fit settings (FIT_OPTIONS, with their values)."""
    kept, skip = [], 0
    for token in align_args:
        if skip:
            skip -= 1
        elif token in FIT_OPTIONS:
            skip = FIT_OPTIONS[token]
        else:
            kept.append(token)
    return kept


def mean_axis_args(candidate_args: list[str], layers: list[int]) -> list[str]:
    """`unlock align` arguments of the mean-axis control: the candidate's rows, fit uncentred at rank 1 with
    no ridge (the map then sends every direction onto the target's mean stream axis), at its layers."""
    fit = ["--rank", "1", "--ridge", "0", "--no-center", "--layers", ",".join(map(str, layers))]
    return [*without_fit_options(candidate_args), *fit]
