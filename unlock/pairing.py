"""Which token positions of two models' streams over the same text are paired for the alignment fit.

Two tokenizations of one text are paired where both end a token at the same character offset: both streams
there have read exactly the same text. With one tokenizer every position pairs with itself; with two, only the
shared boundaries pair, so cross-family models pair too. Positions whose text prefix an earlier text already
had (a shared template instruction, say) are left out: a causal model's stream there is the same row again.
"""

from __future__ import annotations

from collections.abc import Sequence

POSITIONS = ("auto", "last", "all")  # auto: all where both tokenizers allow it (unlock.rows)


def pair_positions(
    source_ends: Sequence[int], target_ends: Sequence[int], skip: int = 0
) -> list[tuple[int, int]]:
    """(source index, target index) pairs of the tokens that end at the same character offset, in order.

    ``*_ends`` give each token's end offset (-1: covers no text, never paired). When several tokens end at one
    offset (a character split over byte tokens), the last of them pairs: it has read the whole prefix. Pairs
    with either index below ``skip`` are left out (the first positions are attention sinks, whose huge
    activations carry no meaning of the text).
    """
    last_source = {end: i for i, end in enumerate(source_ends) if end >= 0}
    last_target = {end: j for j, end in enumerate(target_ends) if end >= 0}
    shared = sorted(set(last_source) & set(last_target))
    pairs = [(last_source[end], last_target[end]) for end in shared]
    return [(i, j) for i, j in pairs if i >= skip and j >= skip]


def corpus_pairs(
    prompts: Sequence[str],
    source_ends: Sequence[Sequence[int]],
    target_ends: Sequence[Sequence[int]],
    skip: int = 0,
) -> list[list[tuple[int, int]]]:
    """Per prompt, its pairs (`pair_positions`) less those whose text prefix an earlier prompt had."""
    seen: set[str] = set()
    result = []
    for prompt, ends_s, ends_t in zip(prompts, source_ends, target_ends, strict=True):
        fresh = []
        for i, j in pair_positions(ends_s, ends_t, skip):
            prefix = prompt[: ends_s[i]]
            if prefix not in seen:
                seen.add(prefix)
                fresh.append((i, j))
        result.append(fresh)
    return result
