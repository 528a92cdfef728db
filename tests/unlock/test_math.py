"""Extraction and alignment against the equations of DESIGN ("The method"), recomputed here with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unlock.align import FitSettings, align_activations, depth_map, fit_layer, split_indices
from unlock.directions import extract_directions
from unlock.layers import parse_layer_spec

rng = np.random.default_rng(0)


def dense_map(x_s: np.ndarray, x_t: np.ndarray, k: int, center: bool) -> np.ndarray:
    """W = V_s pinv(X_s V_s) (X_t V_t) V_t^T with top-k right singular vectors, in numpy."""
    if center:
        x_s, x_t = x_s - x_s.mean(0), x_t - x_t.mean(0)
    v_s = np.linalg.svd(x_s, full_matrices=False)[2][:k].T
    v_t = np.linalg.svd(x_t, full_matrices=False)[2][:k].T
    return v_s @ np.linalg.pinv(x_s @ v_s) @ (x_t @ v_t) @ v_t.T


def as_dense(layer_map) -> np.ndarray:
    return (layer_map.v_s @ layer_map.m @ layer_map.v_t.T).numpy()


# -- directions


def test_mean_direction_is_mean_of_differences():
    locked, unlocked = rng.normal(size=(12, 3, 8)), rng.normal(size=(12, 3, 8))
    got = extract_directions(torch.tensor(locked), torch.tensor(unlocked), "mean")
    assert got.dtype == torch.float32 and got.shape == (3, 8)
    np.testing.assert_allclose(got.numpy(), (unlocked - locked).mean(0), rtol=1e-5, atol=1e-6)


def test_pca_direction_is_first_component_signed_and_scaled_by_the_mean():
    # Differences spread mostly along one axis, plus a shift against that axis: the sign must follow the mean.
    axis = rng.normal(size=(2, 10))
    spread = rng.normal(size=(30, 2, 1)) * 5.0 * axis + rng.normal(size=(30, 2, 10)) * 0.1
    shift = -0.7 * axis
    locked = rng.normal(size=(30, 2, 10))
    unlocked = locked + spread + shift
    got = extract_directions(torch.tensor(locked), torch.tensor(unlocked), "pca").numpy()
    diffs = unlocked - locked
    for layer in range(2):
        d = diffs[:, layer]
        centred = d - d.mean(0)
        eigvals, eigvecs = np.linalg.eigh(centred.T @ centred)
        first = eigvecs[:, -1]
        along = first @ d.mean(0)
        np.testing.assert_allclose(got[layer], first * along, rtol=1e-4, atol=1e-6)  # sign-free: first*along
        assert got[layer] @ d.mean(0) > 0  # agrees with the mean


def test_pca_needs_two_examples_and_shapes_must_agree():
    one = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="at least 2"):
        extract_directions(one, one + 1, "pca")
    with pytest.raises(ValueError, match="must both be"):
        extract_directions(torch.zeros(3, 2, 4), torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="unknown aggregation"):
        extract_directions(one, one, "median")


# -- alignment


@pytest.mark.parametrize(
    ("n", "d_s", "d_t", "rank", "center"),
    [(40, 24, 16, 8, False), (40, 24, 16, 8, True), (10, 16, 24, 32, False), (10, 16, 24, 32, True)],
)
def test_fit_layer_matches_the_equations(n, d_s, d_t, rank, center):
    x_s = rng.normal(size=(n, d_s)) + 3.0  # an offset, so centring changes the answer
    x_t = x_s @ rng.normal(size=(d_s, d_t)) + rng.normal(size=(n, d_t)) - 2.0
    layer_map = fit_layer(torch.tensor(x_s), torch.tensor(x_t), rank, center)
    k = min(rank, n)
    assert layer_map.v_s.shape == (d_s, k) and layer_map.m.shape == (k, k) and layer_map.v_t.shape == (d_t, k)
    np.testing.assert_allclose(as_dense(layer_map), dense_map(x_s, x_t, k, center), atol=1e-9)
    # M solves the least-squares problem between the subspaces: the normal equations hold.
    xs_c = x_s - (x_s.mean(0) if center else 0)
    xt_c = x_t - (x_t.mean(0) if center else 0)
    a, b = xs_c @ layer_map.v_s.numpy(), xt_c @ layer_map.v_t.numpy()
    np.testing.assert_allclose(a.T @ (a @ layer_map.m.numpy() - b), 0.0, atol=1e-7)


def test_centring_ignores_constant_offsets():
    x_s, x_t = rng.normal(size=(30, 12)), rng.normal(size=(30, 10))
    plain = fit_layer(torch.tensor(x_s), torch.tensor(x_t), 6, center=True)
    shifted = fit_layer(torch.tensor(x_s + 5.0), torch.tensor(x_t - 7.0), 6, center=True)
    np.testing.assert_allclose(as_dense(plain), as_dense(shifted), atol=1e-9)


@pytest.mark.parametrize(
    ("n_s", "n_t", "expected"), [(6, 4, [0, 1, 3, 5]), (3, 5, [0, 0, 1, 1, 2]), (4, 4, [0, 1, 2, 3])]
)
def test_depth_map_formula(n_s, n_t, expected):
    assert [depth_map(t, n_s, n_t) for t in range(n_t)] == expected
    assert expected == [min(math.floor((n_s - 1) * t / (n_t - 1)), n_s - 1) for t in range(n_t)]
    assert depth_map(0, n_s, 1) == 0  # a one-layer target maps to the first source layer


def test_align_uses_the_mapped_source_layer_across_sizes_and_depths():
    """Target layer t is a linear image of source layer s(t) only (a rank-5 latent): the map recovers it
    exactly on held-out prompts, so a wrong depth mapping would show up as a large error."""
    n, n_s, n_t, d_s, d_t, latent = 60, 6, 4, 32, 20, 5
    source = rng.normal(size=(n, n_s, d_s))
    target = np.empty((n, n_t, d_t))
    for t in range(n_t):
        z = rng.normal(size=(n, latent))
        source[:, depth_map(t, n_s, n_t)] = z @ rng.normal(size=(latent, d_s))
        target[:, t] = z @ rng.normal(size=(latent, d_t))
    fitted = align_activations(
        torch.tensor(source), torch.tensor(target), [0, 1, 2, 3], FitSettings((latent,), holdout=0.25, seed=3)
    )
    assert fitted.source_layers == [0, 1, 3, 5]
    assert (fitted.n_fit, fitted.n_holdout, fitted.rank) == (45, 15, latent)
    assert max(fitted.errors) < 1e-6  # held-out errors come from moments: exact to ~sqrt(eps)
    # The error is the held-out relative residual, recomputed here.
    fit, held = split_indices(n, 0.25, 3)
    for t, s, layer_map, error in zip(
        fitted.target_layers, fitted.source_layers, fitted.maps, fitted.errors, strict=True
    ):
        w = dense_map(source[fit.numpy(), s], target[fit.numpy(), t], latent, False)
        np.testing.assert_allclose(as_dense(layer_map), w, atol=1e-8)
        x_s, x_t = source[held.numpy(), s], target[held.numpy(), t]
        assert error == pytest.approx(np.linalg.norm(x_t - x_s @ w) / np.linalg.norm(x_t), abs=1e-7)


def test_exact_linear_relation_is_recovered_on_held_out_data():
    """X_t = X_s A with A invertible and N >= hidden: the fitted map is A, with ~0 held-out error."""
    n, d = 80, 16
    a = np.eye(d) + 0.3 * rng.normal(size=(d, d))
    assert abs(np.linalg.det(a)) > 1e-3
    x_s = rng.normal(size=(n, 2, d))
    x_t = x_s @ a  # both layers related by the same A
    for rank in (d, 64):  # k = min(rank, N) and never above the hidden size
        fitted = align_activations(
            torch.tensor(x_s), torch.tensor(x_t), [0, 1], FitSettings((rank,), holdout=0.25)
        )
        assert fitted.rank == d
        for layer_map, error in zip(fitted.maps, fitted.errors, strict=True):
            np.testing.assert_allclose(as_dense(layer_map), a, atol=1e-8)
            assert error < 1e-6


def test_target_directions_apply_the_map_to_the_mapped_source_direction():
    n, n_s, n_t, d_s, d_t = 30, 5, 3, 12, 9
    source, target = rng.normal(size=(n, n_s, d_s)), rng.normal(size=(n, n_t, d_t))
    directions = rng.normal(size=(n_s, d_s))
    settings = FitSettings((4,), center=True, holdout=0.0, folds=0)
    fitted = align_activations(torch.tensor(source), torch.tensor(target), [0, 2], settings)
    assert fitted.n_holdout == 0 and fitted.error_kind == "none" and all(math.isnan(e) for e in fitted.errors)
    got = fitted.target_directions(torch.tensor(directions))
    for row, (t, s) in enumerate(zip([0, 2], [0, 4], strict=True)):
        w = dense_map(source[:, s], target[:, t], 4, center=True)
        np.testing.assert_allclose(got[row].numpy(), directions[s] @ w, rtol=1e-5, atol=1e-6)


def test_split_is_seeded_disjoint_and_complete():
    fit, held = split_indices(10, 0.2, seed=1)
    assert len(held) == 2 and len(fit) == 8
    assert sorted(fit.tolist() + held.tolist()) == list(range(10))
    assert torch.equal(split_indices(10, 0.2, seed=1)[1], held)
    with pytest.raises(ValueError, match="fraction"):
        split_indices(10, 1.0)
    with pytest.raises(ValueError, match="cannot hold out"):
        split_indices(1, 0.5)


# -- layer specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("all", [0, 1, 2, 3, 4, 5]), ("1-3", [1, 2, 3]), ("0,2,5", [0, 2, 5]), ("-1", [5]), ("-3--1", [3, 4, 5]),
     ("4,-2,0", [0, 4])],
)  # fmt: skip
def test_layer_spec(spec, expected):
    assert parse_layer_spec(spec, 6) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [("6", "out of range"), ("-7", "out of range"), ("a-b", "not an index"), ("3-1", "start after end"),
     ("", "not an index")],
)  # fmt: skip
def test_bad_layer_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_spec(spec, 6)
