"""How artifacts name models (`unlock.identity`): names and config hashes, never the builder's folders unless
asked; extracted files written when the name keys held folders still align."""

from __future__ import annotations

import json

import pytest

from unlock.identity import model_name, source_model, with_legacy_paths, without_paths


def folder(tmp_path, name: str, name_or_path: str | None = None):
    path = tmp_path / name
    path.mkdir()
    config = {"architectures": ["Qwen2ForCausalLM"]}
    if name_or_path is not None:
        config["_name_or_path"] = name_or_path
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_folder_is_named_by_its_last_component_or_its_hub_id(tmp_path):
    assert model_name(str(folder(tmp_path, "qwen05"))) == "qwen05"
    assert model_name(str(folder(tmp_path, "local", "/home/me/models/x"))) == "local"  # a path: not a name
    assert model_name(str(folder(tmp_path, "copy", "Qwen/Qwen2.5-0.5B"))) == "Qwen/Qwen2.5-0.5B"
    assert model_name("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id, as given


def test_the_source_to_load_is_the_flag_the_recorded_path_or_a_loadable_name(tmp_path):
    path = str(folder(tmp_path, "src"))
    assert source_model({"source_locked": "src"}, path) == path
    assert source_model({"source_locked": "src", "source_locked_path": path}, None) == path
    assert source_model({"source_locked": "Qwen/Qwen2.5-0.5B"}, None) == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(ValueError, match="give its folder with --source-locked"):
        source_model({"source_locked": "src"}, None)


def test_an_old_extracted_file_s_folders_become_names_and_unwritten_paths(tmp_path):
    path = folder(tmp_path, "src")
    old = {"source_locked": str(path), "source_unlocked": str(path), "n": "3"}
    meta = with_legacy_paths(old)
    assert (meta["source_locked"], meta["source_locked_path"]) == ("src", str(path.resolve()))
    assert without_paths(meta) == {"source_locked": "src", "source_unlocked": "src", "n": "3"}


def test_names_and_hub_ids_are_left_as_they_are():
    meta = {"source_locked": "Qwen/Qwen2.5-0.5B", "source_unlocked": "tiny-source0"}
    assert with_legacy_paths(meta) == meta
    assert with_legacy_paths({"n": "3"}) == {"n": "3"}
