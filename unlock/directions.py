"""One direction per source layer from paired locked/unlocked activations (DESIGN step 2)."""

from __future__ import annotations

import torch

AGGREGATIONS = ("mean", "pca")


def extract_directions(
    locked: torch.Tensor, unlocked: torch.Tensor, aggregation: str = "mean"
) -> torch.Tensor:
    """locked, unlocked: [N, L, d], row i of both from the same question. Returns float32 [L, d].

    ``mean``: the mean over examples of unlocked - locked.
    ``pca``: the first principal direction of the centred differences, signed to agree with the mean and
    scaled by the mean's component along it, so ``add`` mode moves the stream by the average shift along it.
    """
    if locked.shape != unlocked.shape or locked.dim() != 3:
        raise ValueError(
            f"locked and unlocked activations must both be [N, layers, hidden]; got {tuple(locked.shape)} "
            f"and {tuple(unlocked.shape)}"
        )
    diffs = unlocked.double() - locked.double()  # [N, L, d]
    mean = diffs.mean(dim=0)  # [L, d]
    if aggregation == "mean":
        return mean.float()
    if aggregation != "pca":
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    if diffs.shape[0] < 2:
        raise ValueError("aggregation 'pca' needs at least 2 examples (-n 2); use 'mean' for a single one")
    centred = diffs - mean  # [N, L, d]
    _, _, vh = torch.linalg.svd(
        centred.transpose(0, 1), full_matrices=False
    )  # per layer: vh [L, min(N,d), d]
    first = vh[:, 0, :]  # [L, d], unit rows
    along = (first * mean).sum(
        dim=-1, keepdim=True
    )  # [L, 1]: the mean's component on the axis, with its sign
    return (first * along).float()
