"""Map directions from a source model's residual stream into a target's (DESIGN step 3).

Per target layer t, with source layer s = depth_map(t): V_s, V_t are the top-k right singular vectors of the
source and target activations on the same N prompts (k = min(rank, N)), and M = pinv(X_s V_s) (X_t V_t) is the
k x k least-squares map between the two subspaces. The map W = V_s M V_t^T is kept as its three factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def depth_map(target_layer: int, source_layers: int, target_layers: int) -> int:
    """s = min(floor((n_s - 1) t / (n_t - 1)), n_s - 1): the source layer at the same relative depth."""
    if target_layers == 1:
        return 0
    return min((source_layers - 1) * target_layer // (target_layers - 1), source_layers - 1)


def split_indices(n: int, holdout: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of n prompts into (fit, held-out) indices; holdout is a fraction in [0, 1)."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout}")
    n_hold = math.ceil(holdout * n) if holdout > 0 else 0
    if n - n_hold < 1 or (holdout > 0 and n_hold < 1):
        raise ValueError(
            f"cannot hold out {holdout:.0%} of {n} prompts and fit on the rest; use more prompts"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_hold:].sort().values, order[:n_hold].sort().values


@dataclass
class LayerMap:
    """One target layer's low-rank map: x_t ~ ((x_s - mu_s) V_s) M V_t^T + mu_t (mu = 0 without centring)."""

    v_s: torch.Tensor  # [d_s, k]
    m: torch.Tensor  # [k, k]
    v_t: torch.Tensor  # [d_t, k]
    mu_s: torch.Tensor  # [d_s]
    mu_t: torch.Tensor  # [d_t]

    def apply(self, x_s: torch.Tensor) -> torch.Tensor:
        """Map directions (differences: no means involved) [..., d_s] -> [..., d_t], factor by factor."""
        return ((x_s.double() @ self.v_s) @ self.m) @ self.v_t.T

    def predict(self, x_s: torch.Tensor) -> torch.Tensor:
        """Map activations (points: means included) [N, d_s] -> [N, d_t]."""
        return self.apply(x_s.double() - self.mu_s) + self.mu_t


def top_right_singular(x: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right singular vectors of x [N, d] as columns [d, k] (k <= min(N, d))."""
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh [min(N, d), d]
    return vh[:k].T  # [d, k]


def effective_rank(rank: int, n: int, d_s: int, d_t: int) -> int:
    """k = min(rank, N); also at most either hidden size, beyond which singular vectors do not exist."""
    return min(rank, n, d_s, d_t)


def fit_layer(x_s: torch.Tensor, x_t: torch.Tensor, rank: int, center: bool = False) -> LayerMap:
    """Fit one layer's map on paired activations x_s [N, d_s], x_t [N, d_t] (float64 throughout)."""
    if x_s.shape[0] != x_t.shape[0]:
        raise ValueError(f"source and target activations disagree on N: {x_s.shape[0]} vs {x_t.shape[0]}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    x_s, x_t = x_s.double(), x_t.double()
    mu_s = x_s.mean(0) if center else x_s.new_zeros(x_s.shape[1])
    mu_t = x_t.mean(0) if center else x_t.new_zeros(x_t.shape[1])
    x_s, x_t = x_s - mu_s, x_t - mu_t
    k = effective_rank(rank, x_s.shape[0], x_s.shape[1], x_t.shape[1])
    v_s, v_t = top_right_singular(x_s, k), top_right_singular(x_t, k)  # [d_s, k], [d_t, k]
    m = torch.linalg.pinv(x_s @ v_s) @ (x_t @ v_t)  # [k, N] @ [N, k] -> [k, k]
    return LayerMap(v_s, m, v_t, mu_s, mu_t)


def relative_error(layer_map: LayerMap, x_s: torch.Tensor, x_t: torch.Tensor) -> float:
    """|X_t - X_s W| / |X_t| (Frobenius) on the given prompts; with centring both sides are centred with the
    fit's means, so the error measures the map rather than how large the mean offset is."""
    target = x_t.double() - layer_map.mu_t
    residual = target - layer_map.apply(x_s.double() - layer_map.mu_s)
    return float(residual.norm() / target.norm().clamp_min(1e-300))


@dataclass
class Alignment:
    """The maps of the steered target layers, with the settings and diagnostics an artifact records."""

    target_layers: list[int]
    source_layers: list[int]  # depth_map of each target layer
    maps: list[LayerMap]
    errors: list[float]  # held-out relative error per target layer (NaN when nothing was held out)
    rank: int  # k actually used: effective_rank(rank asked, N fit, d_s, d_t)
    center: bool
    n_fit: int
    n_holdout: int

    def target_directions(self, source_directions: torch.Tensor) -> torch.Tensor:
        """r_t = v_s[s(t)] V_s M V_t^T per steered layer: source [L_s, d_s] -> float32 [len(layers), d_t]."""
        rows = [m.apply(source_directions[s]) for m, s in zip(self.maps, self.source_layers, strict=True)]
        return torch.stack(rows).float()


def align(
    source_acts: torch.Tensor,
    target_acts: torch.Tensor,
    target_layers: list[int],
    rank: int,
    center: bool = False,
    holdout: float = 0.2,
    seed: int = 0,
) -> Alignment:
    """Fit the map of each target layer in ``target_layers``.

    source_acts [N, n_s, d_s] and target_acts [N, n_t, d_t] come from the same N locked prompts. The maps are
    fit on a seeded random split of the prompts and the relative error is measured on the rest.
    """
    n, n_s, d_s = source_acts.shape
    if target_acts.shape[0] != n:
        raise ValueError(
            f"source has {n} prompts but target has {target_acts.shape[0]}; they must be the same"
        )
    n_t, d_t = target_acts.shape[1:]
    fit, held = split_indices(n, holdout, seed)
    source_layers = [depth_map(t, n_s, n_t) for t in target_layers]
    maps, errors = [], []
    for t, s in zip(target_layers, source_layers, strict=True):
        layer_map = fit_layer(source_acts[fit, s], target_acts[fit, t], rank, center)
        maps.append(layer_map)
        has_held = len(held) > 0
        errors.append(
            relative_error(layer_map, source_acts[held, s], target_acts[held, t]) if has_held else math.nan
        )
    return Alignment(
        target_layers,
        source_layers,
        maps,
        errors,
        effective_rank(rank, len(fit), d_s, d_t),
        center,
        len(fit),
        len(held),
    )
