"""unlock-serve's Prometheus metrics, served at /metrics next to vLLM's (same default registry)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# Seconds from another replica's manifest write until requests here see it (a new content offered, a deleted
# name refused): the listener's delivery (or, when polling, up to the poll interval, 2 s by default) plus the
# read; the engine's registration (which the first requests wait for) and unregistering come after.
PROPAGATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60)


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.requests = Counter(
            "unlock_requests",
            "Inference requests by capability applied ('none' if none).",
            ["capability"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "unlock_in_flight_requests",
            "Requests in flight by capability.",
            ["capability"],
            registry=registry,
        )
        self.registry_size = Gauge(
            "unlock_registry_capabilities",
            "Capabilities in the registry, as this replica last applied it.",
            registry=registry,
        )
        self.registry_generation = Gauge(
            "unlock_registry_generation",
            "Generation of the shared manifest this replica last applied.",
            registry=registry,
        )
        self.engine_capabilities = Gauge(
            "unlock_engine_capabilities",
            "Distinct capability contents (sha256) registered on this replica's engine.",
            registry=registry,
        )
        self.propagation = Histogram(
            "unlock_registry_propagation_seconds",
            "Delay from a manifest change by another replica until requests on this one see it.",
            buckets=PROPAGATION_BUCKETS,
            registry=registry,
        )
        self.syncs = Counter(
            "unlock_registry_syncs",
            "Reads of the shared manifest by what prompted them: a change heard (notify, inotify), the read "
            "after a listener (re)starts (catch_up), or the fallback poll (poll).",
            ["trigger"],
            registry=registry,
        )
        self.uploads = Counter(
            "unlock_uploads", "Capability uploads by outcome.", ["outcome"], registry=registry
        )
        self.storage_errors = Counter(
            "unlock_registry_storage_errors",
            "Registry writes refused for a storage fault, by cause (no_space, read_only, "
            "database_unavailable).",
            ["cause"],
            registry=registry,
        )
        self.refusals = Counter(
            "unlock_selection_refusals", "Requests refused for their capability selection.", registry=registry
        )
