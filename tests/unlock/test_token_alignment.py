"""Token-level alignment (issue 14): position pairing, the all-position store, ridge, the split by text, the
identity map of same-model builds, and the artifact metadata of every new setting."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from unlock import Capability
from unlock.align import (
    FitSettings,
    Moments,
    align,
    fit_layer,
    fit_moments,
    fold_of_texts,
    split_indices,
)
from unlock.capture import capture_last_token, format_prompts, load_model
from unlock.cli import main
from unlock.extracted import Extracted
from unlock.pairing import corpus_pairs, pair_positions
from unlock.streams import capture_streams, load_layer, token_ends
from unlock.templates import load_template

DEMO = Path(__file__).resolve().parents[2] / "unlock" / "data" / "demo_questions.jsonl"
TEXT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\nAnswer:\n"
rng = np.random.default_rng(7)


@pytest.fixture(scope="module")
def source(tiny_source_model):
    return load_model(str(tiny_source_model), device="cpu")


@pytest.fixture(scope="module")
def target(tiny_target_model):
    return load_model(str(tiny_target_model), device="cpu")


# -- pairing


def test_one_tokenizer_pairs_every_position_with_itself_after_the_skipped_ones(target):
    ids, ends = token_ends(target.tokenizer, TEXT)
    assert len(ids) > 10 and all(e > 0 for e in ends)
    assert pair_positions(ends, ends, skip=2) == [(i, i) for i in range(2, len(ids))]


def test_two_tokenizers_pair_where_both_end_a_token_at_the_same_character(source, target):
    ids_s, ends_s = token_ends(source.tokenizer, TEXT)
    ids_t, ends_t = token_ends(target.tokenizer, TEXT)
    assert ends_s != ends_t  # the two vocabularies really cut the text differently
    pairs = pair_positions(ends_s, ends_t)
    # Independently of the offsets: a pair is where both decoded prefixes are the same text.
    prefix_s = [source.tokenizer.decode(ids_s[: i + 1]) for i in range(len(ids_s))]
    prefix_t = [target.tokenizer.decode(ids_t[: j + 1]) for j in range(len(ids_t))]
    shared = sorted(set(prefix_s) & set(prefix_t), key=len)
    assert pairs == [(prefix_s.index(p), prefix_t.index(p)) for p in shared]
    assert 0 < len(pairs) < max(len(ids_s), len(ids_t)) and pairs[-1] == (len(ids_s) - 1, len(ids_t) - 1)
    assert all(prefix_s[i] == prefix_t[j] == TEXT[: ends_s[i]] for i, j in pairs)


def test_pairing_rules_for_shared_ends_empty_tokens_and_the_skip():
    # Two source tokens end at 5 (a character split over bytes): the later one has read it all. Tokens that
    # cover no text (-1) never pair. Pairs with an index below the skip are dropped on either side.
    assert pair_positions([2, 5, 5, 9], [-1, 5, 9]) == [(2, 1), (3, 2)]
    assert pair_positions([2, 5, 5, 9], [-1, 5, 9], skip=2) == [(3, 2)]


def test_positions_whose_text_prefix_was_seen_before_are_left_out(target):
    template = load_template("direct")
    prompts = format_prompts(target.tokenizer, ["What is 2 + 2?", "What is 3 + 5?"], template)
    ends = [token_ends(target.tokenizer, p)[1] for p in prompts]
    first, second = corpus_pairs(prompts, ends, ends, skip=0)
    assert first == pair_positions(ends[0], ends[0])  # the first text keeps every position
    seen = {prompts[0][:e] for e in ends[0]}
    assert second == [(i, i) for i, e in enumerate(ends[1]) if prompts[1][:e] not in seen]
    assert len(ends[1]) - len(second) > 20  # the template's instruction is not counted twice
    assert second[-1] == (len(ends[1]) - 1,) * 2  # the end differs: kept


# -- the all-position store


def test_store_holds_every_position_and_resumes_without_recapturing(target, tmp_path, monkeypatch):
    prompts = format_prompts(target.tokenizer, [f"Item {i}: what is {i} + {2 * i}?" for i in range(20)],
                             load_template("direct"))  # fmt: skip
    chunks = capture_streams(target, prompts, tmp_path, batch_size=3)
    assert [len(c.ids) for c in chunks] == [16, 4]  # CHUNK_TEXTS prompts a file
    lengths = [len(ids) for c in chunks for ids in c.ids]
    layer = load_layer(chunks, 2).float()  # [tokens, hidden]
    assert layer.shape == (sum(lengths), target.hidden_size) and chunks[0].layer(2).dtype == torch.float16
    last = capture_last_token(target, prompts)[:, 2]  # [N, hidden]
    torch.testing.assert_close(layer[torch.tensor(lengths).cumsum(0) - 1], last, rtol=2e-3, atol=2e-3)
    with torch.no_grad():  # every position of one prompt, run alone, against the store
        ids = torch.tensor([chunks[1].ids[3]])
        alone = target.model(input_ids=ids, output_hidden_states=True).hidden_states[3][0]
    start = sum(lengths[:19])
    torch.testing.assert_close(layer[start : start + ids.shape[1]], alone, rtol=2e-3, atol=2e-3)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished chunk was captured again")

    monkeypatch.setattr("unlock.streams.write_chunk", refuse)
    again = capture_streams(target, prompts, tmp_path, batch_size=3)
    assert [c.path for c in again] == [c.path for c in chunks]


# -- ridge, the split by text, cross-validation


def test_ridge_is_the_closed_form_and_zero_is_the_pseudo_inverse():
    n, d_s, d_t, k, ridge = 50, 12, 10, 6, 0.3
    x_s = rng.normal(size=(n, d_s)) * np.linspace(0.2, 3.0, d_s) + 1.0
    x_t = x_s @ rng.normal(size=(d_s, d_t)) + 0.5 * rng.normal(size=(n, d_t))
    for center in (False, True):
        xs = x_s - x_s.mean(0) if center else x_s
        xt = x_t - x_t.mean(0) if center else x_t
        v_s = np.linalg.svd(xs, full_matrices=False)[2][:k].T
        v_t = np.linalg.svd(xt, full_matrices=False)[2][:k].T
        a, b = xs @ v_s, xt @ v_t
        lam = ridge * np.trace(xs.T @ xs) / d_s  # relative to the mean diagonal of X_s^T X_s
        expected = v_s @ np.linalg.solve(a.T @ a + lam * np.eye(k), a.T @ b) @ v_t.T
        got = fit_layer(torch.tensor(x_s), torch.tensor(x_t), k, center, ridge)
        np.testing.assert_allclose((got.v_s @ got.m @ got.v_t.T).numpy(), expected, atol=1e-9)
        plain = fit_layer(torch.tensor(x_s), torch.tensor(x_t), k, center, 0.0)
        paper = v_s @ np.linalg.pinv(a) @ b @ v_t.T
        np.testing.assert_allclose((plain.v_s @ plain.m @ plain.v_t.T).numpy(), paper, atol=1e-9)
        assert got.m.norm() < plain.m.norm()  # the ridge shrinks the map
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
        fit_layer(torch.tensor(x_s), torch.tensor(x_t), k, ridge=-1.0)


def grouped_rows(n_texts: int, per_text: int, d_s: int, d_t: int):
    groups = torch.arange(n_texts).repeat_interleave(per_text)
    x_s = torch.tensor(rng.normal(size=(n_texts * per_text, d_s)))
    x_t = x_s @ torch.tensor(rng.normal(size=(d_s, d_t))) + 0.1 * torch.tensor(
        rng.normal(size=(len(groups), d_t))
    )
    return x_s, x_t, groups


def test_holdout_leaves_out_whole_texts():
    n_texts, d_s, d_t = 20, 8, 6
    x_s, x_t, groups = grouped_rows(n_texts, 5, d_s, d_t)
    fit, held = split_indices(n_texts, 0.25, seed=1)
    poisoned = x_t.clone()
    poisoned[torch.isin(groups, held)] = (
        1e6  # the held-out texts' rows: were any fit on, the map would show it
    )
    settings = FitSettings((6,), holdout=0.25, seed=1)
    fitted = align(lambda s, t: (x_s, poisoned, groups), n_texts, 1, 1, [0], settings)
    keep = torch.isin(groups, fit)
    reference = fit_layer(x_s[keep], x_t[keep], 6)
    torch.testing.assert_close(fitted.maps[0].apply(torch.eye(d_s)), reference.apply(torch.eye(d_s)))
    assert (fitted.n_fit, fitted.n_holdout, fitted.n_pairs, fitted.error_kind) == (15, 5, 75, "holdout")
    assert fitted.errors[0] > 0.99  # scored on the poisoned rows, which the map cannot predict


def test_cross_validation_refits_without_each_fold_of_texts_and_the_map_uses_every_text():
    n_texts, d_s, d_t, folds = 12, 8, 6, 4
    x_s, x_t, groups = grouped_rows(n_texts, 3, d_s, d_t)
    settings = FitSettings((5,), center=True, ridges=(0.05,), folds=folds, seed=2)
    fitted = align(lambda s, t: (x_s, x_t, groups), n_texts, 1, 1, [0], settings)
    assert (fitted.n_fit, fitted.n_holdout, fitted.n_pairs, fitted.error_kind) == (12, 0, 36, "cv4")
    everything = fit_layer(x_s, x_t, 5, True, 0.05)  # the stored map: fit on every text
    torch.testing.assert_close(fitted.maps[0].apply(torch.eye(d_s)), everything.apply(torch.eye(d_s)))
    fold_of = fold_of_texts(torch.arange(n_texts), folds, seed=2)
    sizes = [sum(1 for f in fold_of.values() if f == k) for k in range(folds)]
    assert sizes == [3, 3, 3, 3]  # whole texts, near-equal folds
    fold = torch.tensor([fold_of[int(g)] for g in groups])
    residual = energy = 0.0
    for k in range(folds):  # refit from the rows themselves, not from moments
        held_map = fit_layer(x_s[fold != k], x_t[fold != k], 5, True, 0.05)
        target = x_t[fold == k] - held_map.mu_t
        residual_rows = target - held_map.apply(x_s[fold == k] - held_map.mu_s)
        r, e = float(residual_rows.square().sum()), float(target.square().sum())
        residual, energy = residual + r, energy + e
    assert fitted.errors[0] == pytest.approx(math.sqrt(residual / energy), rel=1e-9)
    parts = Moments.of(x_s[:10], x_t[:10]) + Moments.of(x_s[10:], x_t[10:])
    torch.testing.assert_close(
        fit_moments(parts, 5).apply(torch.eye(d_s)), fit_layer(x_s, x_t, 5).apply(torch.eye(d_s))
    )


# -- `unlock build` / `align` end to end on the tiny models


def corpus(path: Path, n: int) -> Path:
    texts = [
        f"Sam buys {i} pens at {i + 2} dollars each and pays with a {10 * i} dollar bill." for i in range(n)
    ]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def plain_build(tmp_path: Path, source: Path, target: Path) -> list[str]:
    return [
        "build", "--source-locked", str(source), "--target", str(target), "--data", str(DEMO), "-n", "12",
        "--name", "x", "-o", str(tmp_path / "x.safetensors"), "--device", "cpu",
    ]  # fmt: skip


def build(tmp_path: Path, source: Path, target: Path, name: str, *extra: str) -> Capability:
    out = tmp_path / f"{name}.safetensors"
    argv = [
        "build", "--source-locked", str(source), "--target", str(target), "--data", str(DEMO), "-n", "12",
        "--rank", "8", "--layers", "all", "--name", name, "-o", str(out), "--device", "cpu", *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key written is a known one
        return Capability.load(out)


def test_token_level_build_across_tokenizers_records_every_setting(
    tmp_path, capsys, tiny_source_model, tiny_target_model
):
    data, store = corpus(tmp_path / "corpus.jsonl", 10), tmp_path / "streams"
    extra = ["--align-positions", "all", "--align-data", str(data), "--align-field", "text",
             "--align-template", "plain", "--align-skip", "1", "--ridge", "0.1", "--cv-folds", "5",
             "--capture-dir", str(store)]  # fmt: skip
    capability = build(tmp_path, tiny_source_model, tiny_target_model, "tok", *extra)
    meta = capability.metadata
    assert (meta["alignment"], meta["align_positions"], meta["align_data"], meta["align_field"]) == (
        "fit", "all", "corpus.jsonl", "text",
    )  # fmt: skip
    assert (meta["align_template"], meta["align_skip"], meta["align_n"], meta["ridge"]) == (
        "plain",
        "1",
        "10",
        "0.1",
    )
    assert (meta["cv_folds"], meta["error_kind"], meta["n_fit"], meta["n_holdout"]) == ("5", "cv5", "10", "0")
    assert int(meta["n_pairs"]) > 10 * 5  # many pairs a text, not one
    assert meta["rank"] == "8" and len(capability.alignment_errors) == 4
    assert len(list(store.glob("*/chunk-*.safetensors"))) == 2  # one chunk per model, kept for reuse
    # The pairs are exactly the shared token boundaries of the two tokenizers, counted here from the texts.
    src, tgt = (
        load_model(str(tiny_source_model), device="cpu"),
        load_model(str(tiny_target_model), device="cpu"),
    )
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    ends = [[token_ends(lm.tokenizer, t)[1] for t in texts] for lm in (src, tgt)]
    assert int(meta["n_pairs"]) == sum(len(p) for p in corpus_pairs(texts, *ends, skip=1))
    assert "alignment   all positions of 10 texts (corpus.jsonl)" in capsys.readouterr().out
    # Rerun from the store: the same bytes (the store is reused, the fit is deterministic).
    again = build(tmp_path, tiny_source_model, tiny_target_model, "tok", *extra)
    assert again.sha256 == capability.sha256


def test_same_tokenizer_token_level_fit_equals_the_maps_of_the_pairs(tmp_path, tiny_target_model, target):
    """Two copies of the tiny target (different folders, so no identity shortcut): one tokenizer, so every
    position from --align-skip on pairs with itself, and the maps fit on those rows reproduce the paper's."""
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(tiny_target_model, twin)
    data = corpus(tmp_path / "corpus.jsonl", 6)
    capability = build(
        tmp_path, twin, tiny_target_model, "twin", "--align-positions", "all", "--align-data", str(data),
        "--align-field", "text", "--align-template", "plain", "--cv-folds", "0", "--rank", "64",
        "--ridge", "0",
    )  # fmt: skip
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    ends = [token_ends(target.tokenizer, t)[1] for t in texts]
    pairs = corpus_pairs(texts, ends, ends, skip=2)
    assert all(i == j for p in pairs for i, j in p)
    assert capability.metadata["n_pairs"] == str(sum(len(p) for p in pairs))
    assert capability.metadata["error_kind"] == "none" and capability.alignment_errors is None
    # The source and the target are the same network: the map is the identity on what the rows span.
    extracted_dirs = capability.tensors["source_directions"]
    torch.testing.assert_close(capability.target_directions(), extracted_dirs, rtol=2e-2, atol=2e-2)


def test_same_model_build_stores_its_own_directions_without_a_map(tmp_path, tiny_target_model):
    capability = build(tmp_path, tiny_target_model, tiny_target_model, "self", "--layers", "1-3")
    meta = capability.metadata
    assert (capability.storage, meta["alignment"], json.loads(meta["source_layers"])) == (
        "directions", "identity", [1, 2, 3],
    )  # fmt: skip
    assert "rank" not in meta and "n_pairs" not in meta
    extracted_path = tmp_path / "extracted.safetensors"
    assert main(["extract", "--source-locked", str(tiny_target_model), "--data", str(DEMO), "-n", "12",
                 "-o", str(extracted_path), "--device", "cpu"]) == 0  # fmt: skip
    own = Extracted.load(extracted_path).directions[1:4]
    assert torch.equal(capability.target_directions(), own)  # exactly the model's own directions


def test_select_layers_keeps_the_layers_of_lowest_held_out_error(
    tmp_path, capsys, tiny_source_model, tiny_target_model
):
    capability = build(tmp_path, tiny_source_model, tiny_target_model, "sel", "--select-layers", "2")
    assert "layers      2 of [0, 1, 2, 3] with the lowest held-out error" in capsys.readouterr().out
    meta = capability.metadata
    candidates, errors = json.loads(meta["candidate_layers"]), json.loads(meta["candidate_errors"])
    assert candidates == [0, 1, 2, 3] and meta["layer_selection"] == "lowest-error:2"
    lowest = sorted(sorted(candidates, key=lambda layer: errors[layer])[:2])
    assert capability.layers == lowest and capability.target_directions().shape == (2, 64)
    assert capability.alignment_errors == [errors[layer] for layer in lowest]
    assert json.loads(meta["source_layers"]) == [[0, 1, 3, 5][layer] for layer in lowest]
    everything = build(tmp_path, tiny_source_model, tiny_target_model, "all")  # same fit, every layer
    rows = [candidates.index(layer) for layer in lowest]
    torch.testing.assert_close(capability.target_directions(), everything.target_directions()[rows])
    argv = plain_build(tmp_path, tiny_source_model, tiny_target_model)
    capsys.readouterr()
    assert main([*argv, "--select-layers", "0"]) == 2
    assert "--select-layers 0 picks layers by their held-out map error" in capsys.readouterr().err
    assert main([*argv, "--select-layers", "2", "--cv-folds", "0"]) == 2
    assert "needs K >= 1 and an error" in capsys.readouterr().err


def test_unlock_capture_ahead_is_what_align_reads(
    tmp_path, monkeypatch, tiny_source_model, tiny_target_model
):
    """`unlock capture` with the locked template fills the store that `align --align-positions all` reads:
    with both captured ahead, the build captures nothing (write_chunk would fail) and still fits."""
    store = tmp_path / "streams"
    for model in (tiny_source_model, tiny_target_model):
        argv = ["capture", "--model", str(model), "--data", str(DEMO), "-n", "12", "--template", "direct",
                "--capture-dir", str(store), "--device", "cpu"]  # fmt: skip
        assert main(argv) == 0
    assert len(list(store.glob("*/chunk-*.safetensors"))) == 2

    def refuse(*args, **kwargs):
        raise AssertionError("the build captured again what `unlock capture` had stored")

    monkeypatch.setattr("unlock.streams.write_chunk", refuse)
    capability = build(
        tmp_path, tiny_source_model, tiny_target_model, "ahead", "--align-positions", "all",
        "--capture-dir", str(store),
    )  # fmt: skip
    meta = capability.metadata
    assert (meta["align_data"], meta["align_template"], meta["align_n"]) == (
        "extraction prompts",
        "direct",
        "12",
    )
    assert int(meta["n_pairs"]) > 12


def test_rank_and_ridge_are_chosen_by_held_out_error(tmp_path, capsys, tiny_source_model, tiny_target_model):
    grid = build(tmp_path, tiny_source_model, tiny_target_model, "grid", "--rank", "2,8", "--ridge", "0,0.5")
    assert "grid        mean held-out error {" in capsys.readouterr().out
    meta = grid.metadata
    errors = json.loads(meta["grid_errors"])
    assert sorted(errors) == ["rank=2,ridge=0.0", "rank=2,ridge=0.5", "rank=8,ridge=0.0", "rank=8,ridge=0.5"]
    chosen = f"rank={meta['rank_requested']},ridge={meta['ridge']}"
    assert errors[chosen] == min(errors.values())
    # The chosen point alone gives the same capability, bar the record of the grid.
    single = build(tmp_path, tiny_source_model, tiny_target_model, "grid", "--rank", meta["rank_requested"],
                   "--ridge", meta["ridge"])  # fmt: skip
    torch.testing.assert_close(grid.target_directions(), single.target_directions())
    assert grid.alignment_errors == single.alignment_errors and "grid_errors" not in single.metadata
    assert sum(grid.alignment_errors) / 4 == pytest.approx(errors[chosen], abs=1e-6)
    argv = plain_build(tmp_path, tiny_source_model, tiny_target_model)
    capsys.readouterr()
    assert main([*argv, "--rank", "2,8", "--cv-folds", "0"]) == 2
    assert "needs --cv-folds >= 2 or --holdout > 0" in capsys.readouterr().err
