"""Capability lifecycle in the API process: upload, delete, resolve per request, in-flight tracking.

Invariants: a capability is registered on every worker before its name is published; a name that is gone
(deleted or replaced) is refused at once, but its worker registration is dropped only when no request in
flight still uses that sha256 and no other name points at the same content.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter as Tally
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .engine import EngineRPCError, Workers
from .errors import APIError
from .metrics import Metrics
from .registry import Entry, Registry, Staged, check_name
from .selection import PARAM, Choice

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What an artifact must match to steer the served model."""

    served_names: list[str]
    num_layers: int
    hidden_size: int


@dataclass(frozen=True)
class Applied:
    entry: Entry
    strength: float

    @property
    def label(self) -> str:
        return f"{self.entry.name}@{self.strength:g}"


def _validate(data: bytes, shape: ModelShape) -> Any:
    """Parse and check an artifact; a 400 that quotes the library's reason otherwise."""
    from unlock import ArtifactError, Capability

    try:
        capability = Capability.from_bytes(data)
        capability.check_target(shape.num_layers, shape.hidden_size)
    except ArtifactError as err:
        raise APIError(400, f"invalid capability artifact: {err}", param="body") from None
    return capability


def _entry(name: str, capability: Any, sha256: str, size: int) -> Entry:
    return Entry(
        name=name,
        sha256=sha256,
        mode=capability.mode,
        layers=[int(i) for i in capability.layers],
        default_strength=float(capability.default_strength),
        target={
            "architecture": capability.target_architecture,
            "num_layers": capability.target_num_layers,
            "hidden_size": capability.target_hidden_size,
            "name": capability.target_name,
        },
        metadata=dict(capability.metadata),
        size_bytes=size,
    )


class CapabilityService:
    def __init__(
        self,
        registry: Registry,
        workers: Workers,
        shape: ModelShape,
        metrics: Metrics,
        max_upload_bytes: int,
        max_strength: float,
    ):
        self.registry = registry
        self.workers = workers
        self.shape = shape
        self.metrics = metrics
        self.max_upload_bytes = max_upload_bytes
        self.max_strength = max_strength
        self._lock = asyncio.Lock()  # one write at a time: uploads, deletes
        self._loaded: set[str] = set()  # sha256s registered on the workers
        self._in_flight: Tally[str] = Tally()
        self._unavailable: dict[str, str] = {}  # name -> why it could not be registered at start
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Reload the registry and register every entry on the workers; unusable entries are reported."""
        for entry in self.registry.load():
            try:
                capability = _validate(self.registry.blob_path(entry.sha256).read_bytes(), self.shape)
                del capability
                await self._ensure_loaded(entry.sha256)
            except (APIError, EngineRPCError, OSError) as err:
                reason = err.message if isinstance(err, APIError) else str(err)
                self._unavailable[entry.name] = reason
                logger.error("capability %r (%s) is unavailable: %s", entry.name, entry.sha256[:12], reason)
        self.metrics.registry_size.set(len(self.registry.entries()))
        logger.info(
            "capability registry %s: %d capabilities, %d unavailable",
            self.registry.root,
            len(self.registry.entries()),
            len(self._unavailable),
        )

    # ---- reads
    def list(self) -> list[dict[str, Any]]:
        return [self.public(e) for e in self.registry.entries()]

    def get(self, name: str) -> dict[str, Any]:
        entry = self.registry.get(name)
        if entry is None:
            raise APIError(
                404, f"no capability named {name!r}; GET /v1/capabilities lists them", param="name"
            )
        return self.public(entry)

    def public(self, entry: Entry) -> dict[str, Any]:
        status = "unavailable" if entry.name in self._unavailable else "ready"
        out = {**entry.public(), "status": status, "in_flight": self._in_flight[entry.sha256]}
        if status == "unavailable":
            out["error"] = self._unavailable[entry.name]
        return out

    # ---- writes
    async def upload(
        self, chunks: AsyncIterator[bytes], name: str | None, replace: bool
    ) -> tuple[dict, bool]:
        """Stage, validate, register on the workers, then publish. Returns (JSON, whether it changed)."""
        staged = None
        try:
            if name is not None:
                check_name(name)
            staged = await self.registry.stage(chunks, self.max_upload_bytes)
            return await self._admit(staged, name, replace)
        except APIError:
            # Every refusal counts, bad names and oversized bodies included.
            self.metrics.uploads.labels("rejected").inc()
            raise
        finally:
            if staged is not None:
                staged.path.unlink(missing_ok=True)

    async def _admit(self, staged: Staged, name: str | None, replace: bool) -> tuple[dict, bool]:
        capability = _validate(staged.path.read_bytes(), self.shape)
        name = check_name(name or capability.name)
        async with self._lock:
            existing = self.registry.get(name)
            if existing is not None and existing.sha256 == staged.sha256 and name not in self._unavailable:
                self.metrics.uploads.labels("unchanged").inc()
                return self.public(existing), False
            if existing is not None and existing.sha256 != staged.sha256 and not replace:
                raise APIError(
                    409,
                    f"capability {name!r} already exists with other content "
                    f"(sha256 {existing.sha256[:12]}); add ?replace=true to replace it",
                    param="name",
                )
            self.registry.place(staged)
            try:
                await self._ensure_loaded(staged.sha256)
            except EngineRPCError as err:
                self.registry.drop_blob(staged.sha256)
                raise APIError(500, f"the engine refused capability {name!r}: {err}") from None
            entry = _entry(name, capability, staged.sha256, staged.size_bytes)
            self.registry.publish(entry)
            self._unavailable.pop(name, None)
            if existing is not None and existing.sha256 != entry.sha256:
                await self._retire(existing.sha256)
        self.metrics.uploads.labels("replaced" if existing else "created").inc()
        self.metrics.registry_size.set(len(self.registry.entries()))
        logger.info(
            "capability %r registered (sha256 %s, %s, layers %s)",
            name,
            entry.sha256[:12],
            entry.mode,
            entry.layers,
        )
        return self.public(entry), True

    async def delete(self, name: str) -> dict[str, Any]:
        async with self._lock:
            entry = self.registry.remove(name)
            if entry is None:
                raise APIError(
                    404, f"no capability named {name!r}; GET /v1/capabilities lists them", param="name"
                )
            self._unavailable.pop(name, None)
            await self._retire(entry.sha256)
        self.metrics.registry_size.set(len(self.registry.entries()))
        logger.info("capability %r deleted (%d requests still using it)", name, self._in_flight[entry.sha256])
        return {"id": name, "object": "capability", "deleted": True}

    async def _ensure_loaded(self, sha256: str) -> None:
        if sha256 not in self._loaded:
            await self.workers.register(str(self.registry.blob_path(sha256)), sha256)
            self._loaded.add(sha256)

    async def _retire(self, sha256: str) -> None:
        """Unregister content no name points at, now if idle, else when its last request ends."""
        if self.registry.is_referenced(sha256) or self._in_flight[sha256] > 0:
            return
        if sha256 in self._loaded:
            self._loaded.discard(sha256)
            await self.workers.unregister(sha256)
        self.registry.drop_blob(sha256)

    # ---- per request
    def resolve(self, base_model: str, choices: list[Choice]) -> list[Applied]:
        if base_model not in self.shape.served_names:
            raise APIError(
                400,
                f"capabilities apply to the served model {self.shape.served_names[0]!r}, not {base_model!r}",
                param=PARAM,
            )
        applied = []
        for choice in choices:
            entry = self.registry.get(choice.name)
            if entry is None:
                known = ", ".join(e.name for e in self.registry.entries()) or "none"
                raise APIError(400, f"unknown capability {choice.name!r}; registered: {known}", param=PARAM)
            if choice.name in self._unavailable:
                raise APIError(
                    400,
                    f"capability {choice.name!r} is unavailable: {self._unavailable[choice.name]}",
                    param=PARAM,
                )
            strength = entry.default_strength if choice.strength is None else choice.strength
            applied.append(Applied(entry, strength))
        return applied

    def acquire(self, applied: list[Applied]) -> None:
        for a in applied:
            self._in_flight[a.entry.sha256] += 1
            self.metrics.in_flight.labels(a.entry.name).inc()
            self.metrics.requests.labels(a.entry.name).inc()
        if not applied:
            self.metrics.requests.labels("none").inc()

    def release(self, applied: list[Applied]) -> None:
        for a in applied:
            sha = a.entry.sha256
            self._in_flight[sha] -= 1
            self.metrics.in_flight.labels(a.entry.name).dec()
            if self._in_flight[sha] <= 0:
                del self._in_flight[sha]
                if not self.registry.is_referenced(sha) and sha in self._loaded:
                    task = asyncio.get_running_loop().create_task(self._retire_locked(sha))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _retire_locked(self, sha256: str) -> None:
        async with self._lock:
            await self._retire(sha256)
