"""`unlock calibrate`: a capability's default strength, chosen without labels, through the served model.

The criterion (docs/unlock.md, "Calibration") was read off the outputs of the labelled sweeps of issue 14,
and picks their label-best strengths without seeing a label (bench/calibrate/check.py, docs/RESULTS.md).
Steering by a capability direction acts as a switch.
Below a working window the greedy output is the unsteered one; inside it the output changes and still
answers *its own* prompt; above it the outputs collapse into text that no longer depends on the prompt (the
same invented option list for every question). So, for each strength on a grid and N unlabelled prompts
(the locked template, as a user would send them), the first `max_tokens` greedy tokens are generated, and
each prompt counts as

- switched: its steered text differs from its unsteered text;
- on topic: the served model, unsteered, finds the steered text at least as tied to its own prompt as the
  unsteered text was, and by at least MIN_PMI nats, by the pointwise mutual information
  PMI = log p(text | own prompt) - log p(text | another prompt of the set)
  (from the server's prompt logprobs, `echo`). A collapsed text has PMI near 0 whatever its prompt.

The strength chosen is the smallest that maximises the fraction of prompts both switched and on topic; it
qualifies only if that fraction reaches `min_fraction` (default one half). Otherwise no strength is given,
and the table says why. Where the grid stops too early (the best row, or a row where nothing switched yet, is
its largest strength), up to `extend` larger strengths are measured, each EXTEND_FACTOR times the last, so a
window above the grid is found rather than its edge. Only the prompts' question field is ever read: no
answer, no label.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from tqdm import tqdm

DEFAULT_STRENGTHS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.14, 0.2, 0.3)
CRITERION = "switched-and-on-topic"
MIN_PMI = 1.0  # nats: an on-topic text is at least e times likelier after its own prompt than another's
EXTEND_STEPS = 3  # larger strengths tried at most, past the grid, while its top is still the best
EXTEND_FACTOR = 1.5


class Backend(Protocol):
    """What calibration needs of a served model (`ServedModel`; tests use fakes)."""

    async def generate(self, prompt: str, strength: float) -> str:
        """Greedy continuation of `prompt`, steered by the capability at `strength` (0: unsteered)."""

    async def log_likelihood(self, prompt: str, text: str) -> float:
        """Unsteered log p(text | prompt), summed over the tokens of `text`."""


@dataclass(frozen=True)
class Row:
    """The signals at one strength, over the prompts."""

    strength: float
    switched: float  # fraction of prompts whose text changed
    on_topic: float  # fraction of the switched ones with PMI >= the unsteered text's and >= MIN_PMI
    qualified: float  # fraction of all prompts switched and on topic: the criterion
    mean_pmi: float
    mean_chars: float


@dataclass(frozen=True)
class Decision:
    strength: float | None  # None: no strength qualifies
    reason: str
    rows: tuple[Row, ...]
    min_fraction: float
    prompts: int
    max_tokens: int

    def metadata(self) -> str:
        """The criterion and its figures, as the artifact's `calibration` metadata (JSON)."""
        return json.dumps(
            {
                "criterion": CRITERION,
                "strength": self.strength,
                "min_fraction": self.min_fraction,
                "min_pmi": MIN_PMI,
                "prompts": self.prompts,
                "max_tokens": self.max_tokens,
                "rows": [asdict(row) for row in self.rows],
            },
            sort_keys=True,
        )


def best_row(rows: Sequence[Row]) -> Row:
    """The smallest strength with the largest qualified fraction."""
    return max(rows, key=lambda row: (row.qualified, -row.strength))


def grid_stops_early(rows: Sequence[Row]) -> bool:
    """The largest strength tried is the best one, or switches nothing: a larger one may do better."""
    top = max(rows, key=lambda row: row.strength)
    return best_row(rows) is top or top.switched == 0


def decide(rows: Sequence[Row], min_fraction: float, prompts: int, max_tokens: int) -> Decision:
    """The smallest strength with the largest qualified fraction, if that fraction reaches min_fraction."""
    best = best_row(rows)
    common = {"rows": tuple(rows), "min_fraction": min_fraction, "prompts": prompts, "max_tokens": max_tokens}
    if best.qualified < min_fraction:
        return Decision(
            None,
            f"no strength qualifies: at best {best.qualified:.0%} of the prompts (at {best.strength:g}) were "
            f"switched and stayed on topic, below {min_fraction:.0%}; the capability does not switch this "
            "model's outputs at any strength tried without taking them off their prompts",
            **common,
        )
    edge = (
        "; it is the largest strength tried, and a larger one may qualify more"
        if grid_stops_early(rows)
        else ""
    )
    return Decision(
        best.strength,
        f"{best.qualified:.0%} of the prompts switched and stayed on topic at {best.strength:g}{edge}",
        **common,
    )


def table(decision: Decision) -> str:
    lines = [f"{'strength':>9} {'switched':>9} {'on topic':>9} {'qualified':>9} {'PMI':>7} {'chars':>6}"]
    for row in decision.rows:
        mark = "  <- chosen" if row.strength == decision.strength else ""
        lines.append(
            f"{row.strength:>9g} {row.switched:>9.0%} {row.on_topic:>9.0%} {row.qualified:>9.0%} "
            f"{row.mean_pmi:>7.1f} {row.mean_chars:>6.0f}{mark}"
        )
    return "\n".join(lines)


async def measure(
    backend: Backend,
    prompts: Sequence[str],
    strengths: Sequence[float],
    concurrency: int = 16,
    progress: bool = True,
    extend: int = 0,
) -> list[Row]:
    """The signals at each strength, and at up to `extend` larger ones while the grid stops early; PMI
    against the next prompt of the list (a fixed derangement)."""
    if len(prompts) < 2:
        raise ValueError("calibration needs at least 2 prompts (PMI compares each with another)")
    if not strengths or any(not (math.isfinite(s) and s > 0) for s in strengths):
        raise ValueError(f"strengths must be positive numbers, got {list(strengths)}")
    other = [prompts[(i + 1) % len(prompts)] for i in range(len(prompts))]
    gate = asyncio.Semaphore(concurrency)
    total = len(prompts) * (len(strengths) + 1)
    bar = tqdm(total=total, desc="calibrate", unit="prompt", disable=not progress)

    pmi_of: dict[tuple[int, str], float] = {}  # an unswitched text scores as the unsteered one did

    async def one(i: int, strength: float) -> tuple[str, float]:
        async with gate:
            text = await backend.generate(prompts[i], strength)
            if (i, text) not in pmi_of:
                own, elsewhere = await asyncio.gather(
                    backend.log_likelihood(prompts[i], text), backend.log_likelihood(other[i], text)
                )
                pmi_of[i, text] = own - elsewhere
        bar.update()
        return text, pmi_of[i, text]

    async def at(strength: float) -> list[tuple[str, float]]:
        return await asyncio.gather(*(one(i, strength) for i in range(len(prompts))))

    async def row_at(strength: float) -> Row:
        steered = await at(strength)
        switched = [s[0].strip() != b[0].strip() for s, b in zip(steered, base, strict=True)]
        on_topic = [s[1] >= max(b[1], MIN_PMI) for s, b in zip(steered, base, strict=True)]
        n_switched = sum(switched)
        both = sum(s and t for s, t in zip(switched, on_topic, strict=True))
        return Row(
            strength=strength,
            switched=n_switched / len(prompts),
            on_topic=both / n_switched if n_switched else 0.0,
            qualified=both / len(prompts),
            mean_pmi=sum(s[1] for s in steered) / len(prompts),
            mean_chars=sum(len(s[0]) for s in steered) / len(prompts),
        )

    try:
        base = await at(0.0)
        rows = [await row_at(strength) for strength in strengths]
        for _ in range(extend):
            if not grid_stops_early(rows):
                break
            bar.total += len(prompts)
            larger = float(f"{max(row.strength for row in rows) * EXTEND_FACTOR:.3g}")
            rows.append(await row_at(larger))
    finally:
        bar.close()
    return rows


class ServedModel:
    """A capability on a running unlock-serve, through its OpenAI API (the official `openai` client)."""

    def __init__(self, base_url: str, model: str, capability: str, api_key: str | None, max_tokens: int):
        from openai import AsyncOpenAI

        url = base_url.rstrip("/") + "/v1"
        self.client = AsyncOpenAI(base_url=url, api_key=api_key or "none", timeout=600)
        self.model, self.capability, self.max_tokens = model, capability, max_tokens

    async def generate(self, prompt: str, strength: float) -> str:
        extra = {"capabilities": {self.capability: strength}} if strength else None
        response = await self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=self.max_tokens, temperature=0.0, extra_body=extra
        )
        return response.choices[0].text

    async def log_likelihood(self, prompt: str, text: str) -> float:
        if not text:
            return 0.0
        response = await self.client.completions.create(
            model=self.model, prompt=prompt + text, max_tokens=1, temperature=0.0, echo=True, logprobs=0
        )
        logprobs = response.choices[0].logprobs
        end = len(prompt + text)
        return sum(
            lp
            for lp, offset in zip(logprobs.token_logprobs, logprobs.text_offset, strict=True)
            if lp is not None and len(prompt) <= offset < end
        )

    async def close(self) -> None:
        await self.client.close()


def calibrate_served(
    capability,
    base_url: str,
    prompts: Sequence[str],
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    max_tokens: int = 48,
    min_fraction: float = 0.5,
    model: str | None = None,
    api_key: str | None = None,
    admin_key: str | None = None,
    progress: bool = True,
    extend: int = EXTEND_STEPS,
) -> Decision:
    """Upload `capability` (an `unlock.Capability`) under a temporary name, measure, decide, delete it."""
    from unlock_client import UnlockClient

    probe = f"calibrate-{capability.sha256[:12]}"
    with UnlockClient(base_url, api_key=admin_key or api_key) as admin:
        model = model or admin.served_model()
        admin.upload_bytes(capability.to_bytes(), name=probe, replace=True)
        try:
            backend = ServedModel(base_url, model, probe, api_key, max_tokens)

            async def run() -> list[Row]:
                try:
                    return await measure(backend, prompts, strengths, progress=progress, extend=extend)
                finally:
                    await backend.close()

            rows = asyncio.run(run())
        finally:
            admin.delete(probe)
    return decide(rows, min_fraction, len(prompts), max_tokens)
