"""What an artifact records about a model: what identifies it, never where it lay on the builder's machine.

A model is named by its folder's last component, or by the hub id it came from (`_name_or_path` in its
config.json, when that is a hub-like `owner/name`), or by the hub id it was loaded by; it is identified by the
first 16 hex digits of the sha256 of its config.json. Its architecture and sizes are recorded next to these
(`source_architecture`, `target_num_layers`, ...). The folder itself is recorded only on request
(`--record-paths`): `<role>_path`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unlock.capture import LoadedModel

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hugging Face hub spells them
ROLES = ("source_locked", "source_unlocked", "target")
PATH_KEYS = tuple(f"{role}_path" for role in ROLES)
CONFIG_HASH_KEYS = tuple(f"{role}_config_sha256" for role in ROLES)


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not Path(name).exists()


def _config_file(name_or_path: str) -> Path | None:
    folder = Path(name_or_path)
    if folder.is_dir():
        return folder / "config.json" if (folder / "config.json").is_file() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(name_or_path, "config.json", local_files_only=True)
    except Exception:  # not in the local cache: hash the loaded config instead
        return None
    return Path(found) if found else None


def model_name(name_or_path: str) -> str:
    """The name an artifact records: a hub id as given; a folder's hub id (from its config.json) if it has a
    hub-like one, else the folder's last component."""
    folder = Path(name_or_path)
    if not folder.exists():
        return name_or_path  # a hub id (or whatever the loader took)
    config = _config_file(name_or_path)
    if config is not None:
        recorded = json.loads(config.read_text()).get("_name_or_path")
        if isinstance(recorded, str) and HUB_ID.match(recorded) and not Path(recorded).is_absolute():
            return recorded
    return folder.resolve().name


def config_sha256(lm: LoadedModel) -> str:
    """The first 16 hex digits of the sha256 of the model's config.json (of its loaded config if the file is
    not at hand)."""
    return config_sha256_of(lm.name, lm.model.config.to_json_string)


def config_sha256_of(name_or_path: str, loaded_config_json: Callable[[], str]) -> str:
    """`config_sha256` of a model known by name or folder (the server's, which holds no `LoadedModel`)."""
    config = _config_file(name_or_path)
    data = config.read_bytes() if config is not None else loaded_config_json().encode()
    return hashlib.sha256(data).hexdigest()[:16]


def model_path(name_or_path: str) -> str:
    """What `--record-paths` records: the folder, absolute; a hub id as given."""
    folder = Path(name_or_path)
    return str(folder.resolve()) if folder.exists() else name_or_path


def identity(role: str, lm: LoadedModel) -> dict[str, str]:
    """`<role>_config_sha256` and `<role>_path` of a model (the caller drops the path unless asked). The name,
    architecture and sizes have keys of their own (`source_locked`, `target_name`, ...)."""
    return {f"{role}_config_sha256": config_sha256(lm), f"{role}_path": model_path(lm.name)}


def without_paths(metadata: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k not in PATH_KEYS}


def source_model(metadata: dict[str, str], given: str | None) -> str:
    """What to load as the source-locked model of an extracted file: `given` (align's --source-locked), else
    its recorded path, else its recorded name when that loads as is (a hub id; a folder path, as files written
    before names were recorded hold)."""
    if given:
        return given
    if metadata.get("source_locked_path"):
        return metadata["source_locked_path"]
    name = metadata["source_locked"]
    if Path(name).exists() or is_hub_id(name):
        return name
    raise ValueError(
        f"the extracted file names its source model {name!r} but records no path to it (it was extracted "
        "without --record-paths): give its folder with --source-locked"
    )


def with_legacy_paths(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata of an extracted file written when `source_locked`/`source_unlocked` held the folders, as an
    artifact records it: the folders move to `*_path` (written only with --record-paths), the keys hold
    names. (`Extracted.load` leaves a file's metadata as it is.)"""
    out = dict(metadata)
    for role in ("source_locked", "source_unlocked"):
        value = out.get(role)
        if value and (Path(value).is_absolute() or Path(value).exists()):
            out.setdefault(f"{role}_path", model_path(value))
            out[role] = Path(value).resolve().name
    return out
