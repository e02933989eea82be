"""The server's metrics in Prometheus' text format (``GET /metrics``).

Kept by the HTTP front, which sees every request and every slice result: each result says
which batch of which replica it ran in, so batch sizes and how many adapters a batch mixed
are counted once per batch.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("samed_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("samed_request_seconds", "Request latency", ["route"], buckets=_LATENCY_BUCKETS,
                                 registry=self.registry)
        self.slices = Counter("samed_slices", "Slices predicted, by adapter", ["adapter"], registry=self.registry)
        self.batch_size = Histogram("samed_batch_slices", "Slices per forward batch", buckets=_BATCH_BUCKETS,
                                    registry=self.registry)
        self.batch_adapters = Histogram("samed_batch_adapters", "Adapters mixed in one batch", buckets=_BATCH_BUCKETS,
                                        registry=self.registry)
        self.adapter_loads = Gauge("samed_adapter_loads", "Adapter files loaded onto a replica's SAM", ["replica"],
                                   registry=self.registry)
        self.in_progress = Gauge("samed_requests_in_progress", "Segment requests being answered",
                                 registry=self.registry)
        self._seen: set[tuple[str, int]] = set()
        #: the adapter versions, (name, fingerprint), each replica held after its latest batch
        #: (``GET /v1/adapters``' "resident")
        self.resident: dict[str, set[tuple[str, str]]] = {}

    def batch(self, info: dict[str, Any]) -> None:
        """Count the batch a slice result ran in, once per batch."""
        key = (str(info.get("replica", "")), int(info.get("batch", 0)))
        self.resident[key[0]] = {(str(name), str(fingerprint)) for name, fingerprint in info.get("resident", ())}
        if key in self._seen:
            return
        if len(self._seen) > 100_000:  # a long-running server: old batches will not come again
            self._seen.clear()
        self._seen.add(key)
        self.batch_size.observe(info.get("size", 0))
        self.batch_adapters.observe(info.get("adapters", 0))
        self.adapter_loads.labels(key[0]).set(info.get("loads", 0))

    def resident_on(self, name: str, fingerprint: str) -> int:
        """On how many replicas version ``fingerprint`` of adapter ``name`` was resident after their latest batch."""
        return sum((name, fingerprint) in versions for versions in self.resident.values())

    def text(self) -> bytes:
        return generate_latest(self.registry)
