"""Capability lifecycle in the API process: upload, delete, resolve per request, in-flight tracking.

Invariants: a capability is registered on every worker of this replica before its name is published. A name
another replica published is offered here as soon as its registration is sent to the workers; a request that
selects it before they answer waits for the answer (`ready`: one engine step), and is refused if they refuse
it. A name that is gone (deleted or replaced) is refused at once, but its worker registration is dropped only
when no request in flight still uses that sha256 and no other name points at the same content.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from unlock_client.spec import Spec, format_spec

from .changes import POLL, ChangeListener
from .engine import EngineRPCError, Workers
from .errors import APIError
from .manifest import Manifest, ManifestEntry
from .metrics import Metrics
from .registry import Registry, Staged, check_name, name_clash
from .selection import PARAM, Choice
from .storage import storage_fault

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What an artifact must match to steer the served model."""

    served_names: list[str]
    num_layers: int
    hidden_size: int


@dataclass(frozen=True)
class Applied:
    entry: ManifestEntry
    strength: float
    positions: str  # the tokens it edits: the capability's own, or the request's override

    @property
    def label(self) -> str:
        own = self.positions == default_positions(self.entry)  # the capability's own go unwritten
        return format_spec(Spec(self.entry.name, self.strength, None if own else self.positions))

    @property
    def wire(self) -> tuple[str, float, str, str]:
        """This term of the request's wire selection (`unlock_vllm.request`)."""
        return (self.entry.sha256, self.strength, self.entry.mode, self.positions)


@dataclass(frozen=True)
class Read:
    """How a sync came to read a manifest (wall clock, as its `updated_at`): what woke it, when that was
    heard, when the sync ran, when it held the lock, and when the read returned. A slow propagation's log
    line splits its time by these: push delivery, the event loop, the lock, the read."""

    trigger: str
    heard_at: float
    asked_at: float
    locked_at: float
    read_at: float

    def times(self) -> tuple[float, float, float, float]:
        return self.heard_at, self.asked_at, self.locked_at, self.read_at


def default_positions(entry: ManifestEntry) -> str:
    from unlock.ops import OPERATORS

    return entry.metadata.get("positions") or OPERATORS[entry.mode].default_positions


def _validate(data: bytes, shape: ModelShape, max_strength: float) -> Any:
    """Parse and check an artifact with the one validator (the CLI's and the workers'); a 400 that quotes
    its reason otherwise."""
    from unlock import ArtifactError, Capability, Limits

    try:
        capability = Capability.from_bytes(data)
        capability.validate(shape.num_layers, shape.hidden_size, Limits(max_strength=max_strength))
    except ArtifactError as err:
        raise APIError(400, f"invalid capability artifact: {err}", param="body") from None
    return capability


def _written(manifest: Manifest, began_at: float, committed_at: float) -> str:
    """For a write's log line: the other replicas' propagation is measured from the manifest's `updated_at`,
    but they can only hear the write once it commits. A manifest older than the call was not written by it
    (another replica had published the same content under the name in between)."""
    if manifest.updated_at < began_at:
        return f"generation {manifest.generation}, already there (no write)"
    after = committed_at - manifest.updated_at
    return f"generation {manifest.generation}, committed {after:.3f} s after its write"


def _entry(name: str, capability: Any, sha256: str, size: int) -> ManifestEntry:
    return ManifestEntry(
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
    """This replica's side of a registry that other replicas may share.

    `_view` is the manifest as applied to this engine: requests resolve against it only, so a name is never
    offered before its content is registered here. Writes change the manifest on disk under the registry's
    lock, then apply it. What other writers change is applied when the registry's listener hears of it
    (`changes.py`), and in any case by a poll once `poll_interval` seconds pass without a sync, which catches
    up whatever a listener missed.
    """

    def __init__(
        self,
        registry: Registry,
        workers: Workers,
        shape: ModelShape,
        metrics: Metrics,
        max_upload_bytes: int,
        max_strength: float,
        poll_interval: float = 2.0,
    ):
        self.registry = registry
        self.workers = workers
        self.shape = shape
        self.metrics = metrics
        self.max_upload_bytes = max_upload_bytes
        self.max_strength = max_strength
        self.poll_interval = poll_interval
        self._lock = asyncio.Lock()  # one change of the view at a time: uploads, deletes, polls
        self._view: dict[str, ManifestEntry] = {}
        self._generation = 0  # of the manifest `_view` was last brought in line with
        self._last_sync = 0.0  # wall time of that
        self._last_propagation: float | None = None
        self._loaded: set[str] = set()  # sha256s registered on the workers
        # sha256 -> its registration, sent to the workers and not answered yet; the result is the refusal
        self._registering: dict[str, asyncio.Task[EngineRPCError | None]] = {}
        self._in_flight: Tally[str] = Tally()
        self._unavailable: dict[str, str] = {}  # name -> why it could not be registered here
        self._tasks: set[asyncio.Task] = set()
        self.listener: ChangeListener | None = None  # set by `start`
        self._woken = asyncio.Event()  # the listener heard of a change not yet read
        self._trigger = POLL  # what woke it first since the last sync
        self._announced: int | None = None  # the highest generation those wakes announced (None: unknown)
        self._heard_at = 0.0  # when the first of those wakes came (wall clock, as manifests' updated_at)
        self._applied_at = 0.0  # monotonic time of the last `_apply`: the fallback poll counts from it
        self._followers: list[asyncio.Task] = []

    async def start(self) -> None:
        """Open the registry, register every entry on the workers (unusable ones are reported), then follow
        other writers' changes: listen, and poll as the fallback."""
        manifest = await asyncio.to_thread(self.registry.open)
        async with self._lock:
            await self._apply(manifest)
        # Started means registered: the log below counts what the workers refused.
        await asyncio.gather(*(asyncio.shield(task) for task in list(self._registering.values())))
        self.listener = self.registry.listener()
        logger.info(
            "capability registry %s (writer %s): %d capabilities, %d unavailable; changes by %s, polled "
            "after %g s without one",
            self.registry.root,
            self.registry.owner,
            len(self._view),
            len(self._unavailable),
            self.listener.mode,
            self.poll_interval,
        )
        loop = asyncio.get_running_loop()
        self._followers = [loop.create_task(self._listen(self.listener)), loop.create_task(self._follow())]

    async def stop(self) -> None:
        tasks = [*self._followers, *self._registering.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.registry.close()

    async def _listen(self, listener: ChangeListener) -> None:
        try:
            await listener.run(self._wake)
        except Exception:  # the poll goes on; /health shows the listener disconnected
            logger.exception("capability registry listener failed; polling only from now on")

    def _wake(self, trigger: str, generation: int | None) -> None:
        """The listener's callback: a change to read. Wakes before the sync runs make one sync; the highest
        generation they announce lets it skip the read when that is applied already (this replica's own
        write, heard back)."""
        if not self._woken.is_set():
            self._trigger, self._announced, self._heard_at = trigger, generation, time.time()
            self._woken.set()
        elif self._announced is not None:
            self._announced = None if generation is None else max(self._announced, generation)

    async def _follow(self) -> None:
        """Sync whenever the listener wakes us, and once `poll_interval` passes without any sync."""
        while True:
            if not self._woken.is_set():
                wait = self._applied_at + self.poll_interval - time.monotonic()
                # Not `asyncio.wait_for`: on Python 3.11 it swallows a cancel (`stop`) that lands as the wake
                # does, and following would never end.
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        await self._woken.wait()
                except TimeoutError:
                    pass
            woken = self._woken.is_set()
            heard = (self._trigger, self._announced, self._heard_at) if woken else (POLL, None, None)
            self._woken.clear()  # a change heard from here on is read by the next sync
            try:
                await self.sync(*heard)
            except Exception:  # a bad read must not end following; the next wake or poll tries again
                logger.exception("capability registry sync failed")
                self._applied_at = time.monotonic()  # retry after a poll interval, not in a tight loop

    async def sync(
        self, trigger: str = POLL, announced: int | None = None, heard_at: float | None = None
    ) -> None:
        """Bring this engine in line with the manifest on disk (what other replicas changed), unless the
        generation a push `announced` is applied already. `heard_at`: when the change was heard (default:
        now)."""
        asked_at = time.time()
        heard_at = asked_at if heard_at is None else heard_at
        async with self._lock:
            if announced is not None and announced <= self._generation:
                return
            locked_at = time.time()
            self.metrics.syncs.labels(trigger).inc()
            manifest = await asyncio.to_thread(self.registry.read)
            await self._apply(manifest, Read(trigger, heard_at, asked_at, locked_at, time.time()))

    async def _apply(self, manifest: Manifest, read: Read | None = None) -> None:
        """Register new and changed entries, retire content no entry names any more, then switch the view.
        Call with `_lock` held. `read`: how a sync came to read `manifest`, for the log."""
        old = self._view
        changed = False
        foreign = manifest if self._last_sync and manifest.writer not in (None, self.registry.owner) else None
        for name, entry in manifest.entries.items():
            before = old.get(name)
            if before is not None and before.sha256 == entry.sha256:
                continue
            changed = True
            try:
                # Loaded or on its way means it was validated against this model.
                if entry.sha256 not in self._loaded and entry.sha256 not in self._registering:
                    _validate(
                        self.registry.blob_path(entry.sha256).read_bytes(), self.shape, self.max_strength
                    )
                    self._register(entry.sha256, foreign)  # not awaited: requests wait for it instead
                self._unavailable.pop(name, None)
            except (APIError, OSError) as err:
                reason = err.message if isinstance(err, APIError) else str(err)
                self._unavailable[name] = reason
                logger.error("capability %r (%s) is unavailable: %s", name, entry.sha256[:12], reason)
        for name in old.keys() - manifest.entries.keys():
            changed = True
            self._unavailable.pop(name, None)
        self._view = dict(manifest.entries)
        now = time.time()  # requests see the change from here (usable, or refused), before any unregistering
        for sha256 in {e.sha256 for e in old.values()} - {e.sha256 for e in self._view.values()}:
            await self._retire(sha256)
        if changed and foreign is not None:
            # Measured from the last manifest write this sync saw; hosts' clocks must agree (NTP).
            self._last_propagation = max(0.0, now - manifest.updated_at)
            self.metrics.propagation.observe(self._last_propagation)
            if read is not None:  # where a slow propagation went, each step's time counted from the write
                since = [max(0.0, t - manifest.updated_at) for t in read.times()]
                logger.info(
                    "capability registry generation %d (by %s) seen here %.3f s after its write: heard on %s "
                    "after %.3f s, synced after %.3f s, locked after %.3f s, read after %.3f s, "
                    "offered in %.3f s",
                    manifest.generation, manifest.writer, self._last_propagation, read.trigger, *since,
                    now - read.read_at,
                )  # fmt: skip
        self._generation, self._last_sync, self._applied_at = manifest.generation, now, time.monotonic()
        self.metrics.registry_size.set(len(self._view))
        self.metrics.registry_generation.set(manifest.generation)
        self.metrics.engine_capabilities.set(len(self._loaded))

    # ---- reads
    def list(self) -> list[dict[str, Any]]:
        return [self.public(e) for _, e in sorted(self._view.items())]

    def get(self, name: str) -> dict[str, Any]:
        entry = self._view.get(name)
        if entry is None:
            raise APIError(
                404, f"no capability named {name!r}; GET /v1/capabilities lists them", param="name"
            )
        return self.public(entry)

    def public(self, entry: ManifestEntry) -> dict[str, Any]:
        status = "unavailable" if entry.name in self._unavailable else "ready"
        out = {**entry.public(), "status": status, "in_flight": self._in_flight[entry.sha256]}
        if status == "unavailable":
            out["error"] = self._unavailable[entry.name]
        return out

    def sync_status(self) -> dict[str, Any]:
        """This replica's view of the shared registry: `lag` is the age of its last sync, which stays below
        `poll_interval` on a healthy replica; `propagation` is how long the last change by another writer
        took to be registered here; `sync` is how changes reach it ("notify", "inotify" or "poll"),
        `listening` whether its listener hears them now, and `sync_note` why not (null when it does)."""
        listener = self.listener
        return {
            "writer": self.registry.owner,
            "generation": self._generation,
            "last_sync": self._last_sync,
            "lag": max(0.0, time.time() - self._last_sync),
            "poll_interval": self.poll_interval,
            "propagation": self._last_propagation,
            "loaded": len(self._loaded),
            "sync": listener.mode if listener else POLL,
            "listening": bool(listener and listener.connected),
            "sync_note": listener.note if listener else "not started",
        }

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
        except Exception as err:
            fault = self._storage_fault(err, "upload")
            if fault is None:
                raise
            raise fault from err
        finally:
            if staged is not None:
                staged.path.unlink(missing_ok=True)

    async def _admit(self, staged: Staged, name: str | None, replace: bool) -> tuple[dict, bool]:
        capability = _validate(staged.path.read_bytes(), self.shape, self.max_strength)
        name = check_name(name or capability.name)
        async with self._lock:
            # Judge "unchanged" and 409 on the manifest as it is now, not on this replica's last poll.
            await self._apply(await asyncio.to_thread(self.registry.read))
            existing = self._view.get(name)
            if existing is not None and existing.sha256 == staged.sha256 and name not in self._unavailable:
                self.metrics.uploads.labels("unchanged").inc()
                return self.public(existing), False
            if existing is not None and existing.sha256 != staged.sha256 and not replace:
                raise name_clash(name, existing.sha256)
            await asyncio.to_thread(self.registry.place, staged)
            entry = _entry(name, capability, staged.sha256, staged.size_bytes)
            try:
                await self._ensure_loaded(staged.sha256)
                # Re-checks the name under the registry lock: another replica may have taken it meanwhile.
                began = time.time()
                manifest, previous = await asyncio.to_thread(self.registry.publish, entry, replace)
                committed = time.time()
            except Exception as err:  # refused, lost the name to another replica, or a disk error
                await self._retire(staged.sha256)
                try:
                    await asyncio.to_thread(self.registry.release, staged.sha256)
                except Exception:
                    # The storage that failed the publish may fail this too (a database that is down): the
                    # blob stays pinned by this writer, unnamed, and is collected once this writer is gone.
                    logger.warning("could not release blob %s", staged.sha256[:12], exc_info=True)
                if isinstance(err, EngineRPCError):
                    # The workers validate with one more fact (the model dtype); a full registry is state.
                    status = {"invalid": 400, "full": 409}.get(err.kind, 500)
                    raise APIError(status, f"the engine refused capability {name!r}: {err}") from None
                raise
            self._unavailable.pop(name, None)
            await self._apply(manifest)
            if previous is not None and previous.sha256 != entry.sha256:
                try:
                    await asyncio.to_thread(self.registry.drop_blob, previous.sha256)
                except Exception:
                    # The replace is published and applied, so its answer must say so, not "nothing was
                    # changed". The old blob, named by no entry, is collected when a replica next starts.
                    logger.warning("could not remove replaced blob %s", previous.sha256[:12], exc_info=True)
        self.metrics.uploads.labels("replaced" if previous else "created").inc()
        logger.info(
            "capability %r registered (sha256 %s, %s, layers %s): %s",
            name,
            entry.sha256[:12],
            entry.mode,
            entry.layers,
            _written(manifest, began, committed),
        )
        return self.public(self._view.get(name, entry)), True

    async def delete(self, name: str) -> dict[str, Any]:
        async with self._lock:
            try:
                began = time.time()
                manifest, entry = await asyncio.to_thread(self.registry.remove, name)
                committed = time.time()
            except Exception as err:
                fault = self._storage_fault(err, "delete")
                if fault is None:
                    raise
                raise fault from err
            await self._apply(manifest)
        if entry is None:
            raise APIError(
                404, f"no capability named {name!r}; GET /v1/capabilities lists them", param="name"
            )
        logger.info(
            "capability %r deleted (%d requests still using it): %s",
            name,
            self._in_flight[entry.sha256],
            _written(manifest, began, committed),
        )
        return {"id": name, "object": "capability", "deleted": True}

    def _storage_fault(self, err: Exception, action: str) -> APIError | None:
        """The 507/503 to answer for `err` from a registry write when it is a storage fault (a full or
        read-only volume, an unreachable database; counted), else None."""
        fault = storage_fault(err, action)
        if fault is None:
            return None
        self.metrics.storage_errors.labels(fault.cause).inc()
        logger.warning("capability %s refused, %s: %s", action, fault.cause, err)
        return fault.error

    def _referenced(self, sha256: str) -> bool:
        return any(e.sha256 == sha256 for e in self._view.values())

    async def _ensure_loaded(self, sha256: str) -> None:
        if sha256 not in self._loaded:
            refusal = await asyncio.shield(self._register(sha256))
            if refusal is not None:
                raise refusal

    def _register(self, sha256: str, written: Manifest | None = None) -> asyncio.Task[EngineRPCError | None]:
        """Send `sha256` to the workers unless it is on its way already; the task answers with their refusal
        (None: registered). `written`: another replica's manifest that named it, for the log."""
        task = self._registering.get(sha256)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._registration(sha256, written))
            self._registering[sha256] = task
        return task

    async def _registration(self, sha256: str, written: Manifest | None) -> EngineRPCError | None:
        try:
            await self.workers.register(str(self.registry.blob_path(sha256)), sha256)
        except Exception as err:  # refused, or the engine failed: the names offering it are unavailable here
            refusal = err if isinstance(err, EngineRPCError) else EngineRPCError(str(err))
            for name, entry in self._view.items():
                if entry.sha256 == sha256:
                    self._unavailable[name] = str(refusal)
                    logger.error("capability %r (%s) is unavailable: %s", name, sha256[:12], refusal)
            return refusal
        else:
            self._loaded.add(sha256)
            if written is not None:  # how long after another replica's write the engine here had it
                since = max(0.0, time.time() - written.updated_at)
                logger.info(
                    "capability content %s of generation %d (by %s) registered on the engine %.3f s after "
                    "its write",
                    sha256[:12], written.generation, written.writer, since,
                )  # fmt: skip
            return None
        finally:
            del self._registering[sha256]
            self.metrics.engine_capabilities.set(len(self._loaded))

    async def ready(self, applied: list[Applied]) -> None:
        """Wait until this replica's workers hold every content `applied` uses: one offered before they
        answered its registration (another replica's change, just read) is waited for here, at most an
        engine step. APIError (400) if they refused it."""
        for a in applied:
            task = self._registering.get(a.entry.sha256)
            refusal = None if task is None else await asyncio.shield(task)
            if refusal is not None:
                raise APIError(400, f"capability {a.entry.name!r} is unavailable: {refusal}", param=PARAM)

    async def _retire(self, sha256: str) -> None:
        """Unregister content no name here points at, now if idle, else when its last request ends. The blob
        on disk is the registry's business: other replicas may still name it."""
        if self._referenced(sha256) or self._in_flight[sha256] > 0:
            return
        if sha256 in self._registering:  # unregister after it is there, or the engine keeps it for good
            await asyncio.shield(self._registering[sha256])
        if sha256 in self._loaded:
            self._loaded.discard(sha256)
            await self.workers.unregister(sha256)
        self.metrics.engine_capabilities.set(len(self._loaded))

    # ---- per request
    def resolve(self, base_model: str, choices: list[Choice]) -> list[Applied]:
        if base_model not in self.shape.served_names:
            raise APIError(
                400,
                f"capabilities apply to the served model {self.shape.served_names[0]!r}, not {base_model!r}",
                param=PARAM,
            )
        from unlock_vllm.request import MAX_SELECTED

        if len(choices) > MAX_SELECTED:
            raise APIError(
                400,
                f"{len(choices)} capabilities selected; a request may select at most {MAX_SELECTED}",
                param=PARAM,
            )
        applied = []
        for choice in choices:
            entry = self._view.get(choice.name)
            if entry is None:
                known = ", ".join(sorted(self._view)) or "none"
                raise APIError(400, f"unknown capability {choice.name!r}; registered: {known}", param=PARAM)
            if choice.name in self._unavailable:
                raise APIError(
                    400,
                    f"capability {choice.name!r} is unavailable: {self._unavailable[choice.name]}",
                    param=PARAM,
                )
            strength = entry.default_strength if choice.strength is None else choice.strength
            applied.append(Applied(entry, strength, choice.positions or default_positions(entry)))
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
                if not self._referenced(sha) and (sha in self._loaded or sha in self._registering):
                    task = asyncio.get_running_loop().create_task(self._retire_locked(sha))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _retire_locked(self, sha256: str) -> None:
        async with self._lock:
            await self._retire(sha256)
