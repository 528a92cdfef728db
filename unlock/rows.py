"""The paired rows an alignment is fit on: which texts, which positions, captured as each needs.

`last` (the paper's): one row per text, its last prompt token; the source rows of the extraction prompts are
the ones `unlock extract` saved. `all`: every token pair of the texts (`unlock.pairing`), from the resumable
all-position stores of both models (`unlock.streams`).
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

from unlock.align import RowsFn
from unlock.capture import LoadedModel, capture_last_token, format_prompts
from unlock.configs import AlignConfig
from unlock.data import load_questions
from unlock.extracted import Extracted
from unlock.identity import source_model
from unlock.model_cache import ModelCache
from unlock.pairing import corpus_pairs
from unlock.served import ServedTarget
from unlock.streams import capture_streams, load_layer
from unlock.targets import Target, capture_target_last, capture_target_streams, has_offsets, target_prompts
from unlock.templates import load_template, template_label


def alignment_rows(
    extracted: Extracted, config: AlignConfig, target: Target, models: ModelCache, stack: ExitStack
) -> tuple[RowsFn, int, dict[str, str]]:
    """The paired rows the maps are fit on (`unlock.align.RowsFn`), the number of texts, and the metadata that
    says where they came from. Captures the target, and the source too on a corpus of its own or at every
    token."""
    opts, timer = models.options, models.timer
    chat = extracted.metadata["chat_template"] == "true"
    if config.align_data is None:
        texts = extracted.questions
    else:
        texts = load_questions(config.align_data, config.align_field, config.align_n)
    template = (
        extracted.metadata["locked_template_text"]
        if config.align_template is None
        else load_template(config.align_template)
    )
    positions = config.align_positions
    source = None
    if positions != "last":
        source = models.get(source_model(extracted.metadata, config.source_locked))
        if positions == "auto":
            positions, why = auto_positions(source, target, texts, template, chat)
            print(f"--align-positions auto: {positions} ({why})")
    meta = {
        "align_positions": positions,
        "align_data": "extraction prompts" if config.align_data is None else Path(config.align_data).name,
        "align_field": extracted.metadata["field"] if config.align_data is None else config.align_field,
        "align_template": (
            extracted.metadata["locked_template"]
            if config.align_template is None
            else template_label(config.align_template)
        ),
        "align_n": str(len(texts)),
    }
    if source is None and config.align_data is not None:
        source = models.get(source_model(extracted.metadata, config.source_locked))  # captured on the corpus
    if source is not None and str(source.num_layers) != extracted.metadata["source_num_layers"]:
        raise ValueError(f"source {source.name!r} no longer has the shape recorded in the extracted file")
    if positions == "last":
        with timer.stage("capture target"):
            prompts = target_prompts(target, texts, template, chat)
            target_acts = capture_target_last(target, prompts, opts.batch_size, chat)
        if config.align_data is None:  # the extraction prompts: their source rows are saved
            source_acts = extracted.locked_acts
        else:
            with timer.stage("capture source on the alignment texts"):
                prompts = format_prompts(source.tokenizer, texts, template, chat)
                source_acts = capture_last_token(source, prompts, opts.batch_size, chat, "source")
        index = torch.arange(len(texts))
        rows: RowsFn = lambda s, t: (source_acts[:, s], target_acts[:, t], index)  # noqa: E731
        return rows, len(texts), meta
    assert source is not None
    prompts = format_prompts(source.tokenizer, texts, template, chat)
    if prompts != target_prompts(target, texts, template, chat):
        raise ValueError(
            "--align-positions all pairs tokens by character offset in one text, but the two chat templates "
            "make different texts; drop --chat-template or use --align-positions last"
        )
    root = config.capture_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="unlock-streams-"))
    with timer.stage("capture source, all positions"):
        chunks_s = capture_streams(source, prompts, root, opts.batch_size, chat)
    with timer.stage("capture target, all positions"):
        chunks_t = capture_target_streams(target, prompts, root, opts.batch_size, chat)
    ends_s = [e for chunk in chunks_s for e in chunk.ends]
    ends_t = [e for chunk in chunks_t for e in chunk.ends]
    pairs = corpus_pairs(prompts, ends_s, ends_t, config.align_skip)
    src_rows, tgt_rows, groups = flat_rows(pairs, [len(e) for e in ends_s], [len(e) for e in ends_t])
    meta["align_skip"] = str(config.align_skip)
    rows = lambda s, t: (  # noqa: E731
        load_layer(chunks_s, s)[src_rows],
        load_layer(chunks_t, t)[tgt_rows],
        groups,
    )
    return rows, len(texts), meta


def auto_positions(
    source: LoadedModel, target: Target, texts: list[str], template: str, chat: bool
) -> tuple[str, str]:
    """`all` where token pairs can be made (both tokenizers give character offsets, and both models read the
    same text), else `last`; with the reason."""
    slow = [lm.name for lm in (source, target) if not has_offsets(lm)]
    if slow:
        return "last", f"no character offsets from the slow tokenizer of {', '.join(map(repr, slow))}"
    if isinstance(target, ServedTarget):  # it reads the texts as they are (never chat-wrapped)
        return "all", "the server's tokenizer gives character offsets: shared boundaries"
    if format_prompts(source.tokenizer, texts, template, chat) != target_prompts(
        target, texts, template, chat
    ):
        return "last", "the two chat templates make different texts"
    same = source.tokenizer.get_vocab() == target.tokenizer.get_vocab()
    return "all", "same tokenizer: every position" if same else "different tokenizers: shared boundaries"


def flat_rows(
    pairs: list[list[tuple[int, int]]], lengths_s: list[int], lengths_t: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-text position pairs -> rows of the concatenated streams: (source rows, target rows, text), [P]."""
    start_s = [0, *torch.tensor(lengths_s).cumsum(0).tolist()]
    start_t = [0, *torch.tensor(lengths_t).cumsum(0).tolist()]
    src = [start_s[k] + i for k, text in enumerate(pairs) for i, _ in text]
    tgt = [start_t[k] + j for k, text in enumerate(pairs) for _, j in text]
    groups = [k for k, text in enumerate(pairs) for _ in text]
    return torch.tensor(src, dtype=torch.long), torch.tensor(tgt, dtype=torch.long), torch.tensor(groups)
