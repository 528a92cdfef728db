"""The model an alignment steers: a folder loaded here with transformers (`LoadedModel`), or a model that
unlock-serve serves (`ServedTarget`, read through its admin capture endpoint). What `pipeline` and `rows` ask
of a target, for either kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from unlock.capture import LoadedModel, capture_last_token, format_prompts
from unlock.configs import AlignConfig
from unlock.identity import config_sha256, model_name
from unlock.model_cache import ModelCache
from unlock.served import ServedTarget
from unlock.streams import Chunk, capture_streams

Target = LoadedModel | ServedTarget


def target_of(config: AlignConfig, models: ModelCache, chat: bool) -> Target:
    """The target ``config`` names: its folder, loaded; or the model served at ``target_url``, described by
    its server (so a bad URL or key fails here, before any capture). ``chat``: whether prompts are wrapped in
    a chat template."""
    if (config.target is None) == (config.target_url is None):
        raise ValueError("give the target as one of --target FOLDER and --target-url URL")
    if config.target is not None:
        return models.get(config.target)
    return served(config.target_url, config.admin_key, config.target_model, models, chat)


def served(
    url: str, admin_key: str | None, model: str | None, models: ModelCache, chat: bool
) -> ServedTarget:
    """The model served at ``url``; refused with a chat template, which only a tokenizer here could apply."""
    if chat:
        raise ValueError(
            f"a served model ({url}) reads prompts as plain completions, tokenized by the server, so they "
            "cannot be wrapped in its chat template (--chat-template, or an extracted file made with it): "
            "drop --chat-template, or give the model's folder instead of its URL"
        )
    return models.served(url, admin_key, model)


def recorded(target: Target) -> tuple[str, str]:
    """The target's name and config hash, as an artifact records them (a served target's from its server)."""
    if isinstance(target, ServedTarget):
        return target.name, target.config_sha256
    return model_name(target.name), config_sha256(target)


def has_offsets(target: Target) -> bool:
    """Whether the target's tokenizer gives character offsets (a fast tokenizer's, here or on the server)."""
    if isinstance(target, ServedTarget):
        return target.offsets
    return bool(getattr(target.tokenizer, "is_fast", False))


def target_prompts(target: Target, texts: Sequence[str], template: str, chat: bool) -> list[str]:
    """The texts in ``template``, as the target reads them (a served target: never chat-wrapped, `served`)."""
    return format_prompts(
        target.tokenizer if isinstance(target, LoadedModel) else None, texts, template, chat
    )


def capture_target_last(target: Target, prompts: Sequence[str], batch_size: int, chat: bool) -> torch.Tensor:
    """The target's stream after every layer at each prompt's last token: float32 [N, layers, hidden]."""
    if isinstance(target, ServedTarget):
        return target.capture_last_token(prompts, "target")
    return capture_last_token(target, prompts, batch_size, chat, "target")


def capture_target_streams(
    target: Target, prompts: Sequence[str], root: str | Path, batch_size: int, chat: bool
) -> list[Chunk]:
    """The target's all-position store on ``prompts`` (`unlock.streams`), filled where it lacks chunks."""
    if isinstance(target, ServedTarget):
        return target.capture_streams(prompts, root)
    return capture_streams(target, prompts, root, batch_size, chat)
