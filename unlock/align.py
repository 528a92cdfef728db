"""Map directions from a source model's residual stream into a target's (DESIGN step 3).

Per target layer t, with source layer s = depth_map(t): V_s, V_t are the top-k right singular vectors of the
source and target activations on the same N paired rows (k = min(rank, N)), and M = pinv(X_s V_s) (X_t V_t) is
the k x k least-squares map between the two subspaces; with a ridge λ > 0 it is (A^T A + λ I)^-1 A^T B instead
(A = X_s V_s, B = X_t V_t; λ = ridge x the mean diagonal of X_s^T X_s, a ridge relative to the activations'
own scale, so one value means the same at every layer and model). The map W = V_s M V_t^T is kept as its
three factors.

Everything is computed from the rows' moments (count, sums, X_s^T X_s, X_t^T X_t, X_s^T X_t), which add over
rows: cross-validation fits on the total less one fold's moments instead of refitting from the rows, and
thousands of token-level pairs cost no more memory than their d x d moments. The right singular vectors of X
are the eigenvectors of X^T X; directions whose eigenvalue is below ``EIG_RTOL`` times the largest are
numerical zeros (a centred fit on N rows has rank N - 1) and get no weight in M, as pinv gives them none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

EIG_RTOL = 1e-12  # singular values below 1e-6 of the largest: treated as zero
FULL_RANK = 2**31 - 1  # `--rank full`: k = min(pairs, d_s, d_t), every direction the rows determine
# `unlock build`'s and `unlock align`'s rank: the smallest of the issue-24 sweep (8, 32, 128, full) within 2
# points of full on GSM8K, at its calibrated strength (docs/RESULTS.md, "Is the map low-rank?"); its factor
# file is a ninth of full's (32 MB against 286 MB for 1.5B -> 0.5B, within the server's 64 MiB upload limit).
DEFAULT_RANK = 128


def rank_label(rank: int) -> str:
    return "full" if rank == FULL_RANK else str(rank)


# One layer's paired rows: x_s [P, d_s], x_t [P, d_t] and the text each row comes from, int64 [P].
RowsFn = Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def depth_map(target_layer: int, source_layers: int, target_layers: int) -> int:
    """s = min(floor((n_s - 1) t / (n_t - 1)), n_s - 1): the source layer at the same relative depth."""
    if target_layers == 1:
        return 0
    return min((source_layers - 1) * target_layer // (target_layers - 1), source_layers - 1)


def split_indices(n: int, holdout: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of n texts into (fit, held-out) indices; holdout is a fraction in [0, 1)."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout}")
    n_hold = math.ceil(holdout * n) if holdout > 0 else 0
    if n - n_hold < 1 or (holdout > 0 and n_hold < 1):
        raise ValueError(f"cannot hold out {holdout:.0%} of {n} texts and fit on the rest; use more texts")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_hold:].sort().values, order[:n_hold].sort().values


def fold_of_texts(texts: torch.Tensor, folds: int, seed: int = 0) -> dict[int, int]:
    """A seeded assignment of whole texts to ``folds`` folds of near-equal size: {text index: fold}."""
    if folds < 2 or folds > len(texts):
        raise ValueError(
            f"cross-validation needs 2 to {len(texts)} folds (one text each at least), got {folds}"
        )
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + 1))
    return {int(texts[i]): rank % folds for rank, i in enumerate(order.tolist())}


@dataclass
class Moments:
    """Sufficient statistics of paired rows for the fit, float64; they add and subtract over disjoint rows."""

    n: int
    sum_s: torch.Tensor  # [d_s]
    sum_t: torch.Tensor  # [d_t]
    ss: torch.Tensor  # [d_s, d_s] = X_s^T X_s
    tt: torch.Tensor  # [d_t, d_t]
    st: torch.Tensor  # [d_s, d_t] = X_s^T X_t

    @classmethod
    def of(cls, x_s: torch.Tensor, x_t: torch.Tensor) -> Moments:
        if x_s.shape[0] != x_t.shape[0]:
            raise ValueError(f"source and target rows disagree on N: {x_s.shape[0]} vs {x_t.shape[0]}")
        x_s, x_t = x_s.double(), x_t.double()
        return cls(x_s.shape[0], x_s.sum(0), x_t.sum(0), x_s.T @ x_s, x_t.T @ x_t, x_s.T @ x_t)

    def _combine(self, other: Moments, sign: int) -> Moments:
        parts = (self.sum_s, self.sum_t, self.ss, self.tt, self.st)
        others = (other.sum_s, other.sum_t, other.ss, other.tt, other.st)
        return Moments(self.n + sign * other.n, *(a + sign * b for a, b in zip(parts, others, strict=True)))

    def __add__(self, other: Moments) -> Moments:
        return self._combine(other, 1)

    def __sub__(self, other: Moments) -> Moments:
        return self._combine(other, -1)

    def centred(
        self, center: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mu_s, mu_t, ss, tt, st) about the means when ``center``, else about zero (mu = 0)."""
        if not center:
            zeros_s, zeros_t = self.sum_s.new_zeros(self.sum_s.shape), self.sum_t.new_zeros(self.sum_t.shape)
            return zeros_s, zeros_t, self.ss, self.tt, self.st
        mu_s, mu_t = self.sum_s / self.n, self.sum_t / self.n
        n = self.n
        return (
            mu_s,
            mu_t,
            self.ss - n * torch.outer(mu_s, mu_s),
            self.tt - n * torch.outer(mu_t, mu_t),
            self.st - n * torch.outer(mu_s, mu_t),
        )


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


def eigenbasis(gram: torch.Tensor) -> torch.Tensor:
    """All eigenvectors of a symmetric gram matrix [d, d] as columns, largest eigenvalue first: the first k
    columns are the top-k right singular vectors of any X with X^T X = gram."""
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors.flip(-1)  # [d, d]


def effective_rank(rank: int, n: int, d_s: int, d_t: int) -> int:
    """k = min(rank, N); also at most either hidden size, beyond which singular vectors do not exist."""
    return min(rank, n, d_s, d_t)


@dataclass
class Decomposed:
    """One fit's means, its top-K eigenbases, and A^T A and A^T B in them (A = X_s V_s, B = X_t V_t): the map
    at any rank k <= K and any ridge follows at k x k cost."""

    n: int
    mu_s: torch.Tensor  # [d_s]
    mu_t: torch.Tensor  # [d_t]
    basis_s: torch.Tensor  # [d_s, K], eigenvectors of X_s^T X_s (centred when the fit is), largest first
    basis_t: torch.Tensor  # [d_t, K]
    ata: torch.Tensor  # [K, K]
    atb: torch.Tensor  # [K, K]
    scale: float  # the mean diagonal of X_s^T X_s, the unit of the ridge


def decompose(moments: Moments, center: bool = False, max_rank: int | None = None) -> Decomposed:
    mu_s, mu_t, ss, tt, st = moments.centred(center)
    d_s, d_t = ss.shape[0], tt.shape[0]
    big_k = min(max_rank or d_s, d_s, d_t)
    basis_s, basis_t = eigenbasis(ss)[:, :big_k], eigenbasis(tt)[:, :big_k]  # [d_s, K], [d_t, K]
    ata = basis_s.T @ ss @ basis_s  # [K, K]
    atb = basis_s.T @ st @ basis_t  # [K, K]
    return Decomposed(moments.n, mu_s, mu_t, basis_s, basis_t, ata, atb, float(torch.trace(ss)) / d_s)


def fit_decomposed(dec: Decomposed, rank: int, ridge: float = 0.0) -> LayerMap:
    """The map at ``rank`` (at most the decomposition's K) and ``ridge`` (float64 throughout)."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    k = min(rank, dec.n, dec.ata.shape[0])  # = effective_rank: K already caps at both hidden sizes
    ata, atb = dec.ata[:k, :k], dec.atb[:k, :k]
    if ridge == 0:
        m = torch.linalg.pinv(ata, rtol=EIG_RTOL, hermitian=True) @ atb  # pinv(A) B = pinv(A^T A) A^T B
    else:
        m = torch.linalg.solve(ata + ridge * dec.scale * torch.eye(k, dtype=ata.dtype), atb)
    return LayerMap(dec.basis_s[:, :k], m, dec.basis_t[:, :k], dec.mu_s, dec.mu_t)


def fit_moments(moments: Moments, rank: int, center: bool = False, ridge: float = 0.0) -> LayerMap:
    """Fit one layer's map from the moments of its paired rows."""
    return fit_decomposed(decompose(moments, center, rank), rank, ridge)


def fit_layer(
    x_s: torch.Tensor, x_t: torch.Tensor, rank: int, center: bool = False, ridge: float = 0.0
) -> LayerMap:
    """Fit one layer's map on paired activations x_s [N, d_s], x_t [N, d_t]."""
    return fit_moments(Moments.of(x_s, x_t), rank, center, ridge)


@dataclass
class HeldOut:
    """Held-out rows' moments centred at a fit's means (a = x_s - mu_s, b = x_t - mu_t) and projected into its
    bases: every map of that fit is scored on them at k x k cost."""

    aa: torch.Tensor  # [K, K] = B_s^T G_aa B_s
    ab: torch.Tensor  # [K, K] = B_s^T G_ab B_t
    bb: float  # tr(G_bb) = |X_t - mu_t|^2


def hold_out(dec: Decomposed, held: Moments) -> HeldOut:
    mu_s, mu_t, n = dec.mu_s, dec.mu_t, held.n
    g_aa = (
        held.ss - torch.outer(held.sum_s, mu_s) - torch.outer(mu_s, held.sum_s) + n * torch.outer(mu_s, mu_s)
    )
    g_ab = (
        held.st - torch.outer(held.sum_s, mu_t) - torch.outer(mu_s, held.sum_t) + n * torch.outer(mu_s, mu_t)
    )
    bb = torch.trace(held.tt) - 2 * held.sum_t @ mu_t + n * mu_t @ mu_t
    b_s, b_t = dec.basis_s, dec.basis_t
    return HeldOut(b_s.T @ g_aa @ b_s, b_s.T @ g_ab @ b_t, float(bb))


def heldout_energy(layer_map: LayerMap, held: HeldOut) -> tuple[float, float]:
    """(|X_t - X_s W|^2, |X_t|^2) on the held-out rows, for a map of the fit ``held`` was projected for:
    tr(G_bb) - 2 tr(W^T G_ab) + tr(W^T G_aa W) with W = V_s M V_t^T (V_t^T V_t = I). The difference of
    traces is exact to about sqrt(machine epsilon) of the relative error."""
    k, m = layer_map.m.shape[0], layer_map.m
    cross = torch.trace(m.T @ held.ab[:k, :k])  # tr(W^T G_ab)
    mapped = torch.trace(m.T @ held.aa[:k, :k] @ m)  # tr(W^T G_aa W)
    return max(held.bb - 2 * float(cross) + float(mapped), 0.0), held.bb


@dataclass
class FitSettings:
    """How every layer's map is fit and scored. Several ranks or ridges: the pair of lowest mean held-out
    error over the layers is used (one pair for every layer, so every layer's factors have the same k)."""

    ranks: tuple[int, ...]
    center: bool = False
    ridges: tuple[float, ...] = (0.0,)
    holdout: float = 0.0  # fraction of texts left out of the fit, scored on
    folds: int = 5  # with holdout 0: k-fold cross-validation over texts for the error (< 2: no error)
    seed: int = 0

    def grid(self) -> list[tuple[int, float]]:
        return [(rank, ridge) for rank in self.ranks for ridge in self.ridges]


@dataclass
class LayerFits:
    """One layer's fit on every fitted text, and the held-out error of each (rank, ridge) of the grid."""

    full: Decomposed
    errors: dict[tuple[int, float], float]  # NaN when nothing is held out
    kind: str  # "cv<k>", "holdout" or "none"
    n_rows: int  # rows fit on


def layer_fits(
    x_s: torch.Tensor, x_t: torch.Tensor, groups: torch.Tensor, n_texts: int, settings: FitSettings
) -> LayerFits:
    """Split the rows by their text (``groups``), fit, and score every grid point on the held-out texts."""
    fit_texts, held_texts = split_indices(n_texts, settings.holdout, settings.seed)
    held = torch.isin(groups, held_texts)
    if len(held_texts):
        fit = Moments.of(x_s[~held], x_t[~held])
        scored, kind = [(fit, Moments.of(x_s[held], x_t[held]))], "holdout"
    elif settings.folds >= 2:
        fold_of = fold_of_texts(fit_texts, settings.folds, settings.seed)
        fold = torch.tensor([fold_of[int(g)] for g in groups.tolist()], dtype=torch.long)  # [P]
        parts = [Moments.of(x_s[fold == f], x_t[fold == f]) for f in range(settings.folds)]
        fit = sum(parts[1:], parts[0])
        scored, kind = [(fit - part, part) for part in parts], f"cv{settings.folds}"
    else:
        fit, scored, kind = Moments.of(x_s, x_t), [], "none"
    big_k = max(settings.ranks)
    decs = [decompose(f, settings.center, big_k) for f, _ in scored]
    held_out = [hold_out(dec, part) for dec, (_, part) in zip(decs, scored, strict=True)]
    errors = {}
    for rank, ridge in settings.grid():
        energies = [
            heldout_energy(fit_decomposed(d, rank, ridge), h) for d, h in zip(decs, held_out, strict=True)
        ]
        residual, total = sum(r for r, _ in energies), sum(e for _, e in energies)
        errors[(rank, ridge)] = math.sqrt(residual / max(total, 1e-300)) if energies else math.nan
    full = decs[0] if kind == "holdout" else decompose(fit, settings.center, big_k)
    return LayerFits(full, errors, kind, fit.n)


@dataclass
class Alignment:
    """The maps of the steered target layers, with the settings and diagnostics an artifact records."""

    target_layers: list[int]
    source_layers: list[int]  # depth_map of each target layer
    maps: list[LayerMap]
    errors: list[float]  # held-out relative error per target layer (NaN when none was measured)
    error_kind: str  # "cv<k>" (k-fold over texts), "holdout" or "none"
    rank: int  # k actually used: effective_rank(rank asked, rows fit, d_s, d_t)
    rank_asked: int  # the chosen rank of the grid
    ridge: float  # the chosen ridge
    grid_errors: dict[tuple[int, float], float]  # mean held-out error over the layers, per grid point
    n_fit: int  # texts fit on
    n_holdout: int  # texts held out
    n_pairs: int  # rows fit on (texts at the last token; token pairs otherwise)

    def subset(self, keep: list[int]) -> Alignment:
        """The same fit restricted to the steered layers at positions ``keep`` (in order)."""
        pick = lambda values: [values[i] for i in keep]  # noqa: E731
        return replace(
            self,
            target_layers=pick(self.target_layers),
            source_layers=pick(self.source_layers),
            maps=pick(self.maps),
            errors=pick(self.errors),
        )

    def target_directions(self, source_directions: torch.Tensor) -> torch.Tensor:
        """r_t = v_s[s(t)] V_s M V_t^T per steered layer: source [L_s, d_s] -> float32 [len(layers), d_t]."""
        rows = [m.apply(source_directions[s]) for m, s in zip(self.maps, self.source_layers, strict=True)]
        return torch.stack(rows).float()


def align(
    rows: RowsFn,
    n_texts: int,
    source_num_layers: int,
    target_num_layers: int,
    target_layers: list[int],
    settings: FitSettings,
) -> Alignment:
    """Fit the map of each target layer in ``target_layers`` from ``rows(s, t)``, the paired rows of source
    layer s and target layer t (with their text indices, 0..n_texts-1)."""
    source_layers = [depth_map(t, source_num_layers, target_num_layers) for t in target_layers]
    fits, d_s, d_t = [], 0, 0
    for t, s in zip(target_layers, source_layers, strict=True):
        x_s, x_t, groups = rows(s, t)
        fits.append(layer_fits(x_s, x_t, groups, n_texts, settings))
        d_s, d_t = x_s.shape[1], x_t.shape[1]
    grid = settings.grid()
    mean_errors = {point: sum(f.errors[point] for f in fits) / len(fits) for point in grid}
    if len(grid) > 1 and fits[0].kind == "none":
        raise ValueError(
            "choosing among several ranks or ridges needs a held-out error: --cv-folds or --holdout"
        )
    rank, ridge = min(grid, key=lambda point: mean_errors[point]) if len(grid) > 1 else grid[0]
    n_hold = len(split_indices(n_texts, settings.holdout, settings.seed)[1])
    return Alignment(
        target_layers=target_layers,
        source_layers=source_layers,
        maps=[fit_decomposed(f.full, rank, ridge) for f in fits],
        errors=[f.errors[(rank, ridge)] for f in fits],
        error_kind=fits[0].kind,
        rank=effective_rank(rank, fits[0].n_rows, d_s, d_t),
        rank_asked=rank,
        ridge=ridge,
        grid_errors=mean_errors,
        n_fit=n_texts - n_hold,
        n_holdout=n_hold,
        n_pairs=fits[0].n_rows,
    )


def align_activations(
    source_acts: torch.Tensor, target_acts: torch.Tensor, target_layers: list[int], settings: FitSettings
) -> Alignment:
    """`align` on last-token activations source [N, n_s, d_s] and target [N, n_t, d_t]: one row per text."""
    n = source_acts.shape[0]
    if target_acts.shape[0] != n:
        raise ValueError(
            f"source has {n} prompts but target has {target_acts.shape[0]}; they must be the same"
        )
    texts = torch.arange(n)
    rows: RowsFn = lambda s, t: (source_acts[:, s], target_acts[:, t], texts)  # noqa: E731
    return align(rows, n, source_acts.shape[1], target_acts.shape[1], target_layers, settings)
