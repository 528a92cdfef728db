"""One `bench/transfer/run.py --out` folder holds one serving setup (bench/transfer/serving_settings.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "transfer"))
from serving_settings import DEFAULTS, SettingsMismatch, resolve_settings  # noqa: E402

NOT_ASKED = {"dtype": None, "max_tokens": None}


def test_a_new_folder_records_what_was_asked_over_the_defaults(tmp_path):
    settings = resolve_settings(tmp_path, {"dtype": "bfloat16", "max_tokens": None}, record=True)
    assert settings == {"dtype": "bfloat16", "max_tokens": DEFAULTS["max_tokens"]}
    assert json.loads((tmp_path / "settings.json").read_text()) == settings


def test_a_resumed_run_or_report_that_asks_nothing_takes_the_recorded_setup(tmp_path):
    resolve_settings(tmp_path, {"dtype": "bfloat16", "max_tokens": 256}, record=True)
    assert resolve_settings(tmp_path, NOT_ASKED, record=False) == {"dtype": "bfloat16", "max_tokens": 256}
    resumed = resolve_settings(tmp_path, {"dtype": "bfloat16", "max_tokens": None}, record=True)
    assert resumed["max_tokens"] == 256


def test_asking_another_setup_of_a_recorded_folder_is_refused_and_changes_nothing(tmp_path):
    resolve_settings(tmp_path, {"dtype": "bfloat16", "max_tokens": None}, record=True)
    before = (tmp_path / "settings.json").read_text()
    with pytest.raises(SettingsMismatch, match="bfloat16"):
        resolve_settings(tmp_path, {"dtype": "float32", "max_tokens": None}, record=True)
    assert (tmp_path / "settings.json").read_text() == before


def test_a_report_of_a_folder_without_settings_writes_none(tmp_path):
    assert resolve_settings(tmp_path, NOT_ASKED, record=False) == DEFAULTS
    assert not (tmp_path / "settings.json").exists()
