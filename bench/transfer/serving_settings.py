"""The serving setup that every per-item file in one `run.py --out` folder shares (its settings.json).

A resumed run, or a report, takes the recorded setup when it does not ask for one, and is refused when it asks
for another: one folder never mixes two serving setups (dtype changes greedy outputs token for token).
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULTS = {"dtype": "float32", "max_tokens": 512}


class SettingsMismatch(ValueError):
    pass


def resolve_settings(out: Path, asked: dict[str, object | None], record: bool) -> dict[str, object]:
    """The setup for `out`: `asked` (None: not asked) over the recorded one, else the defaults.

    `record` writes settings.json when `out` has none yet (not for a report, which serves nothing).
    """
    path = out / "settings.json"
    saved = json.loads(path.read_text()) if path.exists() else None
    base = saved or DEFAULTS
    settings = {key: base[key] if asked.get(key) is None else asked[key] for key in DEFAULTS}
    if saved is not None and settings != saved:
        raise SettingsMismatch(f"{out} holds results served with {saved}; this run asks {settings}")
    if saved is None and record:
        path.write_text(json.dumps(settings, indent=2) + "\n")
    return settings
