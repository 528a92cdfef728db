"""The capability file: exact round trips, stable hashes, factor storage, and validation of bad files."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from unlock import ArtifactError, Capability, TargetInfo
from unlock.artifacts import FORMAT_TAG, read_header_metadata, serialize

TARGET = TargetInfo("Qwen2ForCausalLM", num_layers=4, hidden_size=8, name="tiny-target")


def dense_capability(**overrides) -> Capability:
    args = dict(
        name="cot",
        directions=torch.randn(2, 8, generator=torch.Generator().manual_seed(0)),
        layers=[1, 3],
        mode="rotate",
        default_strength=0.15,
        target=TARGET,
        metadata={"n": "64", "aggregation": "mean"},
    )
    args.update(overrides)
    return Capability.from_directions(**args)


def factor_tensors(layers=2, d_s=12, k=3, d_t=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(layers, d_s, generator=g),
        torch.randn(layers, d_s, k, generator=g),
        torch.randn(layers, k, k, generator=g),
        torch.randn(layers, d_t, k, generator=g),
    )


def test_round_trip_is_exact(tmp_path):
    capability = dense_capability()
    path = tmp_path / "cot.safetensors"
    capability.save(path)
    loaded = Capability.load(path)
    assert path.read_bytes() == capability.to_bytes()
    assert loaded.sha256 == capability.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.metadata == capability.metadata
    assert torch.equal(loaded.target_directions(), capability.target_directions())
    assert (loaded.name, loaded.mode, loaded.layers, loaded.default_strength) == (
        "cot",
        "rotate",
        [1, 3],
        0.15,
    )
    assert (loaded.target_num_layers, loaded.target_hidden_size) == (4, 8)
    assert (loaded.target_name, loaded.target_architecture) == ("tiny-target", "Qwen2ForCausalLM")
    assert loaded.target_directions().dtype == torch.float32 and loaded.target_directions().shape == (2, 8)


def test_same_content_same_bytes_and_the_header_is_self_describing():
    one, two = dense_capability(), dense_capability()
    assert one.to_bytes() == two.to_bytes()
    meta = read_header_metadata(one.to_bytes())
    assert meta["format"] == FORMAT_TAG and meta["format_version"] == "1"
    assert json.loads(meta["layers"]) == [1, 3] and meta["unlock_version"]
    assert dense_capability(default_strength=0.2).sha256 != one.sha256


def test_factors_give_the_dense_target_directions(tmp_path):
    src, v_s, m, v_t = factor_tensors()
    capability = Capability.from_factors("math", src, v_s, m, v_t, [0, 2], "add", 0.05, TARGET)
    expected = np.stack(
        [
            src[i].double().numpy()
            @ v_s[i].double().numpy()
            @ m[i].double().numpy()
            @ v_t[i].double().numpy().T
            for i in range(2)
        ]
    )
    np.testing.assert_allclose(capability.target_directions().numpy(), expected, rtol=1e-5, atol=1e-5)
    capability.save(tmp_path / "m.safetensors")
    loaded = Capability.load(tmp_path / "m.safetensors")
    assert loaded.storage == "factors"
    assert torch.equal(loaded.target_directions(), capability.target_directions())
    assert torch.equal(loaded.tensors["align.m"], m)


def test_check_target_names_the_mismatch():
    capability = dense_capability()
    capability.check_target(4, 8)
    with pytest.raises(ArtifactError, match=r"built for 'tiny-target' \(4 layers, hidden size 8\).*6 layers"):
        capability.check_target(6, 8)
    with pytest.raises(ArtifactError, match="hidden size 16"):
        capability.check_target(4, 16)


def rewrite(capability: Capability, tensors=None, **meta_changes) -> bytes:
    """The capability's bytes with metadata keys changed (None deletes) or tensors replaced."""
    meta = dict(capability.metadata)
    for key, value in meta_changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    return serialize(capability.tensors if tensors is None else tensors, meta)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.to_bytes()[: len(c.to_bytes()) - 5], "corrupt or truncated"),
        (lambda c: c.to_bytes()[:40], "truncated"),
        (lambda c: c.to_bytes()[:4], "too short"),
        (lambda c: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "not valid JSON"),
        (lambda c: rewrite(c, format="something.else"), "format tag"),
        (lambda c: rewrite(c, format_version="2"), "unsupported format_version '2'"),
        (lambda c: rewrite(c, mode=None), r"lacks required keys \['mode'\]"),
        (lambda c: rewrite(c, mode="scale"), "unknown mode"),
        (lambda c: rewrite(c, default_strength="nan"), "finite number"),
        (lambda c: rewrite(c, layers="[3, 1]"), "sorted"),
        (lambda c: rewrite(c, layers="[1, 4]"), "within 0..3"),
        (lambda c: rewrite(c, layers="[1, 2, 3]"), r"shape \[2, 8\] but the metadata implies \[3, 8\]"),
        (lambda c: rewrite(c, target_hidden_size="16"), r"implies \[2, 16\]"),
        (lambda c: rewrite(c, target_num_layers="four"), "must be an integer"),
        (
            lambda c: rewrite(c, tensors={"directions": torch.tensor([[float("nan")] * 8, [1.0] * 8])}),
            "non-finite",
        ),
        (lambda c: rewrite(c, tensors={"directions": torch.zeros(2, 8)}), "zero"),
        (lambda c: rewrite(c, tensors={"weights": torch.ones(2, 8)}), "needs tensors"),
        (lambda c: rewrite(c, storage="factors"), "needs tensors"),
    ],
)
def test_bad_files_raise_artifact_error(tmp_path, change, message):
    data = change(dense_capability())
    with pytest.raises(ArtifactError, match=message):
        Capability.from_bytes(data)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ArtifactError, match="bad.safetensors"):  # load names the file
        Capability.load(path)


def test_factor_shapes_must_agree():
    capability = Capability.from_factors("m", *factor_tensors(), [0, 2], "rotate", 0.1, TARGET)
    tensors = dict(capability.tensors)
    tensors["align.v_t"] = torch.randn(2, 7, 3)  # target hidden 7, metadata says 8
    with pytest.raises(ArtifactError, match="align.v_t"):
        Capability.from_bytes(serialize(tensors, capability.metadata))


def test_unknown_metadata_keys_warn_but_load():
    data = rewrite(dense_capability(), favourite_colour="blue")
    with pytest.warns(UserWarning, match="favourite_colour"):
        assert Capability.from_bytes(data).name == "cot"


def test_from_directions_refuses_metadata_that_overrides_arguments():
    with pytest.raises(ArtifactError, match="'mode' is set from the arguments"):
        dense_capability(metadata={"mode": "add"})


def test_missing_file():
    with pytest.raises(ArtifactError, match="does not exist"):
        Capability.load("/nonexistent/cap.safetensors")


@pytest.mark.parametrize(
    ("mode", "rows", "message"),
    [
        ("add", [1], r"layer\(s\) \[3\] is zero: drop them"),  # one zero row, any mode
        ("ablate", [0], r"layer\(s\) \[1\] is zero"),
        ("add", [0, 1], "every target direction is zero"),
        ("rotate", [0, 1], "every target direction is zero"),
    ],
)
def test_zero_rows_are_refused_for_every_mode(mode, rows, message):
    directions = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    directions[rows] = 0
    with pytest.raises(ArtifactError, match=message):
        dense_capability(mode=mode, directions=directions)


def test_positions_and_row_norm_are_part_of_the_operator_spec():
    assert (dense_capability().positions, dense_capability().row_norm) == ("last_prompt", "unit")
    add = dense_capability(mode="add", metadata={"positions": "generated"})
    assert (add.positions, add.row_norm) == ("generated", "stored")
    torch.testing.assert_close(add.table_rows(), add.target_directions())
    torch.testing.assert_close(dense_capability().table_rows().norm(dim=-1), torch.ones(2))
    with pytest.raises(ArtifactError, match="unknown positions 'middle'"):
        dense_capability(metadata={"positions": "middle"})
    with pytest.raises(ArtifactError, match="row_norm 'stored' is not valid for mode 'ablate'"):
        dense_capability(mode="ablate", metadata={"row_norm": "stored"})
    stored = dense_capability(metadata={"row_norm": "stored"})  # a combined rotate capability
    torch.testing.assert_close(stored.table_rows(), stored.target_directions())


def test_validate_applies_the_deployment_limits():
    from unlock import Limits

    dense_capability().validate(4, 8)
    with pytest.raises(ArtifactError, match="6 layers"):
        dense_capability().validate(6, 8)
    with pytest.raises(ArtifactError, match=r"default_strength 1e\+12 .* outside ±10"):
        dense_capability(default_strength=1e12).validate()
    dense_capability(default_strength=15).validate(limits=Limits(max_strength=20))
    huge = torch.full((2, 8), 3e38)
    with pytest.raises(ArtifactError, match=r"would steer by up to 3e\+39"):
        dense_capability(mode="add", directions=huge).validate()
    # A rotate capability enters as unit rows: however large its directions, what it applies is finite.
    dense_capability(directions=huge).validate()
    big = torch.full((2, 8), 1e3)
    dense_capability(mode="add", directions=big).validate()
    with pytest.raises(ArtifactError, match="float16"):
        dense_capability(mode="add", directions=big).validate(limits=Limits(dtype=torch.float16))
