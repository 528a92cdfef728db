"""How a replica hears that another writer changed the shared manifest, so it syncs at once instead of at its
next poll. Each coordination backend (`coordination.py`, `postgres.py`) offers a `ChangeListener`:
PostgreSQL's LISTEN/NOTIFY (`pglisten.py`), inotify on the registry directory (`dirwatch.py`), or none
(`PollOnly`). The service's poll keeps running behind any of them: a change a listener misses is applied at
the next poll at the latest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

# What made a replica sync: a listener's push ("notify", "inotify"), the read after a listener (re)starts
# ("catch_up": what changed while it was not listening), or the fallback poll ("poll").
CATCH_UP = "catch_up"
POLL = "poll"

# Called by a listener, in the event loop's thread: (trigger, the manifest generation it announces, when
# known). Several calls before the service gets to sync cost one sync.
Wake = Callable[[str, int | None], None]


class ChangeListener(Protocol):
    mode: str  # "notify", "inotify" or "poll": how changes reach this replica (reported by /health)
    connected: bool  # whether it hears changes now (False while it reconnects, and always when polling)
    note: str | None  # why it polls, or why it is not connected; None when it listens

    async def run(self, wake: Wake) -> None:
        """Listen until cancelled, calling `wake(CATCH_UP, None)` each time listening (re)starts and
        `wake(mode, generation)` on each change. Returns at once when there is nothing to listen to."""


class PollOnly:
    """No push: the service's poll alone applies what other writers changed."""

    mode = POLL
    connected = False

    def __init__(self, note: str):
        self.note = note

    async def run(self, wake: Wake) -> None:
        return None
