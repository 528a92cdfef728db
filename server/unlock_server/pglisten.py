"""LISTEN for the manifest changes that writers announce with NOTIFY (`postgres.py`), on a connection of its
own, in the service's event loop.

A notification is delivered only to sessions listening when its transaction commits, so whatever changed
while this one was not (a dropped connection, a database restart) is read right after each LISTEN
(`CATCH_UP`). A connection that dies silently (a network partition) is noticed by TCP keepalives; until then,
and while reconnecting, the service's poll applies the changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import psycopg
from psycopg import sql

from .changes import CATCH_UP, Wake

logger = logging.getLogger(__name__)

MODE = "notify"
RETRY_S = (0.25, 5.0)  # reconnect backoff: first delay, doubled up to the last


def announced(payload: str) -> int | None:
    """The generation a notification announces (its payload), None if it carries none."""
    try:
        return int(payload)
    except ValueError:
        return None


class DatabaseListener:
    """Listens on `channel` through connections made by `connect` (autocommit), reconnecting with backoff."""

    mode = MODE

    def __init__(self, connect: Callable[[], Awaitable[psycopg.AsyncConnection]], channel: str):
        self.connect = connect
        self.channel = channel
        self.connected = False
        self.note: str | None = "not connected yet"
        self.backend_pid: int | None = None  # of the listening session, while connected

    async def run(self, wake: Wake) -> None:
        delay = RETRY_S[0]
        while True:
            try:
                async with await self.connect() as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    if self.note is not None and self.note.startswith("reconnecting"):
                        logger.info("capability registry listener reconnected")
                    self.connected, self.note, self.backend_pid = True, None, conn.info.backend_pid
                    delay = RETRY_S[0]
                    wake(CATCH_UP, None)
                    async for notification in conn.notifies():
                        wake(MODE, announced(notification.payload))
            except psycopg.Error as err:
                if self.connected:
                    logger.warning("capability registry listener lost its connection, reconnecting: %s", err)
                self.note = f"reconnecting: {err}"
            self.connected, self.backend_pid = False, None
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_S[1])
