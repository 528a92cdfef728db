"""Wall time per stage of one `unlock` command, reported when it ends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Timer:
    """Wall time per named stage, in the order the stages first ran."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def report(self) -> str:
        total = sum(self.stages.values()) or 1.0
        lines = [
            f"  {name:<28} {seconds:8.2f} s {100 * seconds / total:5.1f}%"
            for name, seconds in self.stages.items()
        ]
        return "\n".join(["where the time went:", *lines, f"  {'total':<28} {total:8.2f} s"])
