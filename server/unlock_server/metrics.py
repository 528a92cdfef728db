"""unlock-serve's Prometheus metrics, served at /metrics next to vLLM's (same default registry)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge


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
            "unlock_registry_capabilities", "Capabilities in the registry.", registry=registry
        )
        self.uploads = Counter(
            "unlock_uploads", "Capability uploads by outcome.", ["outcome"], registry=registry
        )
        self.refusals = Counter(
            "unlock_selection_refusals", "Requests refused for their capability selection.", registry=registry
        )
