"""Storage faults of the registry, as answers a client can act on.

A registry write (upload, replace, delete) that fails because the volume or the database cannot take it is
not the client's mistake and not a bug: it is answered in the OpenAI error shape with a status that says what
to do, and counted (`unlock_registry_storage_errors_total{cause}`):

- `no_space`: ENOSPC or EDQUOT from the capabilities volume: 507 (free space or raise the quota, then retry);
- `read_only`: EROFS, the volume was mounted or remounted read-only: 503;
- `database_unavailable`: the `--registry-url` database refused, dropped or timed out the connection
  (psycopg's `OperationalError`, its subclasses, and `InterfaceError`): 503 with `Retry-After`.

Every write path cleans up before it raises (the staged upload is deleted, a failed manifest write leaves the
old manifest, a database transaction rolls back), so the registry is as it was before the request.
"""

from __future__ import annotations

import errno
import sys
from dataclasses import dataclass

from .errors import APIError

DATABASE_RETRY_AFTER_S = 5  # long enough for a database restart or failover to show, short for a client
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class StorageFault:
    cause: str  # the metric's label: no_space, read_only, database_unavailable
    error: APIError


def _database_errors() -> tuple[type[BaseException], ...]:
    """psycopg's connection-level errors, if the driver is loaded (only `--registry-url` loads it)."""
    psycopg = sys.modules.get("psycopg")
    if psycopg is None:
        return ()
    return (psycopg.OperationalError, psycopg.InterfaceError)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def storage_fault(err: BaseException, action: str) -> StorageFault | None:
    """The answer to `err`, raised while the registry did `action` ("upload", "delete"), if it is a storage
    fault; None for anything else (which stays a 500)."""
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        reason = "quota exceeded" if err.errno == errno.EDQUOT else "no space left on device"
        return StorageFault(
            "no_space",
            APIError(
                507,
                f"capability {action} failed: the capability registry's volume is full ({reason}); nothing "
                "was changed. Free space on the volume (or raise its quota), then retry",
            ),
        )
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return StorageFault(
            "read_only",
            APIError(
                503,
                f"capability {action} failed: the capability registry's volume is read-only; nothing was "
                "changed. Capabilities already registered keep working; retry once the volume is writable",
            ),
        )
    database_errors = _database_errors()
    if database_errors and isinstance(err, database_errors):
        return StorageFault(
            "database_unavailable",
            APIError(
                503,
                f"capability {action} failed: the registry database is unavailable "
                f"({type(err).__name__}: {_first_line(err)}); nothing was changed. Capabilities already "
                f"registered keep working; retry in {DATABASE_RETRY_AFTER_S} s",
                headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
            ),
        )
    return None
