"""The `unlock` console script end to end on the two tiny models, and its handling of bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unlock import Capability, TargetInfo
from unlock.cli import main
from unlock.extracted import Extracted

UNLOCK = Path(sys.executable).parent / "unlock"
DEMO = Path(__file__).resolve().parents[2] / "unlock" / "data" / "demo_questions.jsonl"
QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have now?"


def run_unlock(*args: str) -> subprocess.CompletedProcess:
    if not UNLOCK.is_file():
        pytest.fail(f"console script {UNLOCK} is missing: install the project (pip install -e .)")
    return subprocess.run([str(UNLOCK), *args], capture_output=True, text=True, timeout=600)


def build_args(source: Path, target: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--source-locked", str(source), "--target", str(target), "--data", str(DEMO), "--field", "question",
        "-n", "24", "--rank", "8", "--aggregation", "mean", "--mode", "rotate", "--strength", "0.5",
        "--layers", "1-3", "--name", "cot", "-o", str(out), "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_source_model, tiny_target_model):
    out = tmp_path_factory.mktemp("build") / "cot.safetensors"
    proc = run_unlock("build", *build_args(tiny_source_model, tiny_target_model, out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_build_writes_a_valid_artifact_and_reports_time(built, tiny_source_model, tiny_target_model):
    out, proc = built
    capability = Capability.load(out)
    capability.check_target(4, 64)  # the tiny Qwen2 target
    assert (capability.name, capability.mode, capability.default_strength) == ("cot", "rotate", 0.5)
    assert capability.layers == [1, 2, 3] and capability.storage == "factors"
    meta = capability.metadata
    assert meta["source_locked"] == tiny_source_model.name and meta["target_name"] == tiny_target_model.name
    assert (meta["source_num_layers"], meta["source_hidden_size"]) == ("6", "128")
    assert json.loads(meta["source_layers"]) == [1, 3, 5]  # depth map 6 -> 4 layers
    # The defaults: every token pair of every text (auto: both tokenizers are fast), centred, the ridge of
    # lowest 5-fold cross-validated error over texts among 0.1, 0.3 and 1 (the rank here is explicit).
    assert (meta["n"], meta["n_fit"], meta["n_holdout"], meta["rank"]) == ("24", "24", "0", "8")
    assert (meta["error_kind"], meta["cv_folds"]) == ("cv5", "5")
    grid = json.loads(meta["grid_errors"])
    assert sorted(grid) == ["rank=8,ridge=0.1", "rank=8,ridge=0.3", "rank=8,ridge=1.0"]
    assert grid[f"rank=8,ridge={meta['ridge']}"] == min(grid.values())
    assert meta["alignment"] == "fit"
    assert (meta["align_positions"], meta["align_data"]) == ("all", "extraction prompts")
    assert meta["align_n"] == "24"
    assert int(meta["n_pairs"]) > 10 * 24  # token pairs, not one row per text
    assert (meta["locked_template"], meta["unlocked_template"], meta["center"]) == ("direct", "cot", "true")
    assert "--align-positions auto: all" in proc.stdout
    errors = capability.alignment_errors
    assert len(errors) == 3 and all(0 < e < 10 for e in errors)
    assert capability.target_directions().shape == (3, 64)
    for stage in (
        "where the time went",
        "capture source-locked",
        "capture source-unlocked",
        "capture target",
    ):
        assert stage in proc.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["cot.safetensors"]  # no temporary files left


def config_hash(model: Path) -> str:
    return hashlib.sha256((model / "config.json").read_bytes()).hexdigest()[:16]


def test_the_artifact_identifies_models_without_the_builder_s_paths(
    built, tiny_source_model, tiny_target_model
):
    """No value of the metadata holds a folder of this machine (the models and the output lie under pytest's
    base temp directory); the models are identified by name, architecture, sizes and config hash."""
    out, _ = built
    meta = Capability.load(out).metadata
    base = str(Path(tiny_source_model).parents[1])  # pytest's basetemp: every folder of this test run
    assert [key for key, value in meta.items() if base in value or "/tmp/" in value] == []
    assert not any(key.endswith("_path") for key in meta)
    assert (meta["source_locked"], meta["source_unlocked"]) == (tiny_source_model.name,) * 2
    assert (meta["source_architecture"], meta["source_num_layers"], meta["source_hidden_size"]) == (
        "LlamaForCausalLM", "6", "128",
    )  # fmt: skip
    assert (meta["target_name"], meta["target_architecture"]) == (tiny_target_model.name, "Qwen2ForCausalLM")
    assert (meta["target_num_layers"], meta["target_hidden_size"]) == ("4", "64")
    assert meta["source_locked_config_sha256"] == config_hash(tiny_source_model)
    assert meta["source_unlocked_config_sha256"] == config_hash(tiny_source_model)
    assert meta["target_config_sha256"] == config_hash(tiny_target_model)


def test_record_paths_keeps_the_folders(tmp_path, tiny_source_model, tiny_target_model):
    out = tmp_path / "cot.safetensors"
    args = build_args(tiny_source_model, tiny_target_model, out, "--record-paths", "--align-positions=last")
    proc = run_unlock("build", *args)
    assert proc.returncode == 0, proc.stderr
    meta = Capability.load(out).metadata
    assert meta["source_locked_path"] == str(tiny_source_model.resolve())
    assert meta["source_unlocked_path"] == str(tiny_source_model.resolve())
    assert meta["target_path"] == str(tiny_target_model.resolve())
    assert meta["source_locked"] == tiny_source_model.name  # the name keys stay names


def test_inspect_describes_the_artifact(built):
    out, _ = built
    proc = run_unlock("inspect", str(out))
    assert proc.returncode == 0, proc.stderr
    capability = Capability.load(out)
    for text in ("cot", capability.sha256, "rotate", "4 layers, hidden 64", "held-out error"):
        assert text in proc.stdout
    as_json = json.loads(run_unlock("inspect", "--json", str(out)).stdout)
    assert as_json["metadata"] == capability.metadata and as_json["sha256"] == capability.sha256
    assert as_json["tensors"]["align.v_t"] == [3, 64, 8]


def test_extract_then_align_gives_the_same_artifact_as_build(
    built, tmp_path, tiny_source_model, tiny_target_model
):
    out, _ = built
    extracted, aligned = tmp_path / "extracted.safetensors", tmp_path / "aligned.safetensors"
    proc = run_unlock(
        "extract", "--source-locked", str(tiny_source_model), "--data", str(DEMO), "--field", "question",
        "-n", "24", "--aggregation", "mean", "-o", str(extracted), "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert str(tiny_source_model) not in extracted.read_bytes().decode("latin-1")  # no path without asking
    saved = Extracted.load(extracted)  # both sides' activations: the direction's reliability can be measured
    assert saved.unlocked_acts is not None and saved.unlocked_acts.shape == saved.locked_acts.shape
    mean_diff = (saved.unlocked_acts.double() - saved.locked_acts.double()).mean(0).float()
    assert torch.allclose(mean_diff, saved.directions, atol=1e-6 * saved.directions.abs().max().item())
    align = [
        "align", "--extracted", str(extracted), "--target", str(tiny_target_model), "--rank", "8",
        "--mode", "rotate", "--strength", "0.5", "--layers", "1-3", "--name", "cot", "-o", str(aligned),
        "--device", "cpu",
    ]  # fmt: skip
    # All-position alignment captures the source again: the file names it, so its folder must be given.
    proc = run_unlock(*align)
    assert proc.returncode != 0 and "give its folder with --source-locked" in proc.stderr, proc.stderr
    proc = run_unlock(*align, "--source-locked", str(tiny_source_model))
    assert proc.returncode == 0, proc.stderr
    assert aligned.read_bytes() == out.read_bytes()


def generate(capsys, model: Path, *extra: str) -> dict:
    assert main([
        "generate", "--model", str(model), "--prompt", QUESTION, "--template", "direct",
        "--max-new-tokens", "12", "--ignore-eos", "--json", "--device", "cpu", *extra,
    ]) == 0  # fmt: skip
    return json.loads(capsys.readouterr().out)


def test_generate_at_strength_zero_is_unsteered_and_positive_strength_changes_it(
    built, capsys, tiny_target_model
):
    out, _ = built
    plain = generate(capsys, tiny_target_model)
    zero = generate(capsys, tiny_target_model, "--capability", f"{out}@0")
    steered = generate(capsys, tiny_target_model, "--capability", f"{out}@1.0")
    assert plain["prompt"].endswith(f"Question: {QUESTION}\nAnswer:\n")
    assert len(plain["token_ids"]) == 12
    assert zero["token_ids"] == plain["token_ids"] and zero["logprobs"] == plain["logprobs"]
    assert steered["token_ids"] != plain["token_ids"]


# -- bad input: a clear message on stderr, exit status 2, nothing written


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, tiny_source_model):
    """The tiny source with NaN weights in decoder layer 2."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("nan-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_source_model)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_source_model / name).exists():
            shutil.copy(tiny_source_model / name, folder / name)
    return folder


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def assert_refused(argv: list[str], capsys, message: str, out: Path | None = None) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.splitlines()[-1].startswith(f"unlock {argv[0]}: error: ")  # after transformers' progress bars
    if out is not None:
        assert not out.exists() and list(out.parent.glob(f".{out.name}*")) == []


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        ("", [], "holds no records"),
        ('{"question": "ok"}\n{"question": oops}\n', [], ":2: not valid JSON"),
        ('["a list"]\n', [], ":1: expected a JSON object"),
        ('{"prompt": "a"}\n', [], "no field 'question' (fields: ['prompt'])"),
        ('{"question": ""}\n', [], "must be a non-empty string"),
        ('{"question": "a"}\n{"question": "b"}\n', ["-n", "3"], "holds 2 records, fewer than -n 3"),
        (None, ["--locked-template", "socratic"], "unknown template 'socratic'"),
        (None, ["--layers", "7"], "out of range for a model with 4 layers"),
        (None, ["-n", "1", "--holdout", "0.2"], "cannot hold out 20% of 1 texts"),
        (None, ["-n", "3"], "--cv-folds 5 needs at least 5 alignment texts, there are 3"),
        (None, ["--ridge", "0,-1"], "--ridge must be finite numbers >= 0, got [0.0, -1.0]"),
        (None, ["--rank", "0"], "--rank must be one or more integers >= 1, got [0]"),
        (None, ["--align-n", "4"], "--align-n needs --align-data"),
        (None, ["--align-data", "/nonexistent.jsonl"], "data file '/nonexistent.jsonl' does not exist"),
        (None, ["--align-template", "socratic"], "unknown template 'socratic'"),
    ],
)
def test_bad_build_input(tmp_path, capsys, tiny_source_model, tiny_target_model, data, extra, message):
    """Checked before any capture starts; `data` None means the good demo file."""
    out = tmp_path / "out.safetensors"
    args = build_args(tiny_source_model, tiny_target_model, out, *extra)
    if data is not None:
        args[args.index("--data") + 1] = str(write(tmp_path / "data.jsonl", data))
    assert_refused(["build", *args], capsys, message, out)


def test_template_file_needs_the_placeholder(tmp_path, capsys, tiny_source_model, tiny_target_model):
    out = tmp_path / "out.safetensors"
    template = write(tmp_path / "t.txt", "No placeholder here\n")
    args = build_args(tiny_source_model, tiny_target_model, out, "--unlocked-template", str(template))
    assert_refused(["build", *args], capsys, "must contain the placeholder {question} exactly once", out)


def test_missing_field_is_named(tmp_path, capsys, tiny_source_model, tiny_target_model):
    out = tmp_path / "out.safetensors"
    args = build_args(tiny_source_model, tiny_target_model, out, "--field", "problem")
    assert_refused(["build", *args], capsys, "no field 'problem' (fields: ['answer', 'question'])", out)


def test_nan_activations_are_refused(tmp_path, capsys, nan_model, tiny_target_model):
    out = tmp_path / "out.safetensors"
    assert_refused(
        ["build", *build_args(nan_model, tiny_target_model, out)], capsys, "at decoder layer 2", out
    )


def test_capability_for_another_model_is_refused(built, capsys, tiny_source_model):
    out, _ = built
    argv = ["generate", "--model", str(tiny_source_model), "--capability", str(out), "--prompt", "hi"]
    assert_refused(argv, capsys, "(4 layers, hidden size 64), but the model has 6 layers, hidden size 128")


def test_truncated_artifact_is_refused(built, tmp_path, capsys, tiny_target_model):
    out, _ = built
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(out.read_bytes()[:-100])
    assert_refused(["inspect", str(truncated)], capsys, "corrupt or truncated")
    argv = [
        "generate",
        "--model",
        str(tiny_target_model),
        "--capability",
        f"{truncated}@0.2",
        "--prompt",
        "hi",
    ]
    assert_refused(argv, capsys, "truncated.safetensors: corrupt or truncated")
    # The real console script exits with the same status and message.
    proc = run_unlock("inspect", str(truncated))
    assert proc.returncode == 2 and "corrupt or truncated" in proc.stderr and proc.stdout == ""


def test_align_refuses_a_file_that_is_not_an_extraction(built, tmp_path, capsys, tiny_target_model):
    out, _ = built
    target = tmp_path / "cap.safetensors"
    argv = [
        "align",
        "--extracted",
        str(out),
        "--target",
        str(tiny_target_model),
        "--name",
        "x",
        "-o",
        str(target),
    ]
    assert_refused(argv, capsys, "expected 'unlock.extracted'", target)


def test_build_with_pca_centring_add_mode_and_dense_storage(tmp_path, tiny_source_model, tiny_target_model):
    out = tmp_path / "pca.safetensors"
    args = build_args(
        tiny_source_model, tiny_target_model, out, "-n", "12", "--aggregation", "pca", "--center"
    )
    args += [
        "--mode",
        "add",
        "--store",
        "directions",
        "--layers",
        "-1",
        "--chat-template",
        "--holdout",
        "0.25",
    ]
    assert main(["build", *args]) == 0
    capability = Capability.load(out)
    assert (capability.mode, capability.storage, capability.layers) == ("add", "directions", [3])
    meta = capability.metadata
    assert (meta["aggregation"], meta["center"], meta["chat_template"]) == ("pca", "true", "true")
    assert (meta["n_fit"], meta["n_holdout"]) == ("9", "3") and len(capability.alignment_errors) == 1
    assert capability.target_directions().shape == (1, 64) and capability.target_directions().norm() > 0


def test_generate_reads_strength_and_positions_per_capability(tmp_path):
    from unlock.cli import parse_capability

    path = tmp_path / "odd@name.safetensors"  # an '@' inside the file name
    directions = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    target = TargetInfo("Qwen2ForCausalLM", 4, 8, "t")
    Capability.from_directions("cot", directions, [1], "rotate", 0.5, target).save(path)
    assert parse_capability(str(path))[1:] == (0.5, "last_prompt")
    assert parse_capability(f"{path}@0.25")[1:] == (0.25, "last_prompt")
    assert parse_capability(f"{path}@0.25:all")[1:] == (0.25, "all")
    assert parse_capability(f"{path}@:generated")[1:] == (0.5, "generated")
    with pytest.raises(ValueError, match="positions"):
        parse_capability(f"{path}@0.25:middle")
    with pytest.raises(ValueError, match="within ±10"):
        parse_capability(f"{path}@20")


def test_the_default_rank_is_the_rank_sweeps_choice():
    """128: the smallest rank within 2 points of full in issue 24's sweep (docs/RESULTS.md)."""
    from unlock.cli import build_parser
    from unlock.configs import AlignConfig

    argv = ["--data", "q.jsonl", "--target", "t", "--name", "n", "-o", "o.safetensors"]
    build = build_parser().parse_args(["build", "--source-locked", "s", *argv])
    align = build_parser().parse_args(["align", "--extracted", "e.safetensors", *argv[2:]])
    assert build.ranks == align.ranks == AlignConfig(target="t", name="n").ranks == (128,)


def test_a_file_over_the_servers_upload_limit_is_flagged_with_what_to_do(monkeypatch):
    """Factors grow with the rank (286 MB at full rank for the 1.5B -> 0.5B map); the server refuses uploads
    over 64 MiB by default, so `align` and `build` say so, and how to store the same steering smaller."""
    from unlock_server.settings import DEFAULT_MAX_UPLOAD_BYTES as server_default

    import unlock.cli
    from unlock.validation import DEFAULT_MAX_UPLOAD_BYTES

    assert DEFAULT_MAX_UPLOAD_BYTES == server_default == 64 * 2**20
    g = torch.Generator().manual_seed(0)
    target = TargetInfo("Toy", 4, 8, "toy")
    factors = [torch.randn(*shape, generator=g) for shape in ((2, 12), (2, 12, 3), (2, 3, 3), (2, 8, 3))]
    low = Capability.from_factors("cot", *factors, [0, 2], "rotate", 0.1, target)
    dense = Capability.from_directions("cot", low.target_directions(), [0, 2], "rotate", 0.1, target)
    assert unlock.cli.upload_size_note(low) is None  # a few kB: nothing to say
    monkeypatch.setattr(unlock.cli, "DEFAULT_MAX_UPLOAD_BYTES", len(dense.to_bytes()))
    note = unlock.cli.upload_size_note(low)
    assert note and "over unlock-serve's default upload limit" in note and "--store directions" in note
    assert unlock.cli.upload_size_note(dense) is None
