"""Prometheus metrics, one registry per app so several apps can live in one process (tests)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from r3_service.store.stores import StoreStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StoreCollector(Collector):
    """Reads the store's own counters at scrape time, so the store needs no Prometheus import."""

    def __init__(self, stats: StoreStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        lookups = CounterMetricFamily("r3_store_lookups", "Query-type store lookups", labels=["result"])
        lookups.add_metric(["hit"], self.stats.hits)
        lookups.add_metric(["miss"], self.stats.misses)
        yield lookups
        yield CounterMetricFamily("r3_store_errors", "Failed Redis round trips", value=self.stats.errors)
        yield CounterMetricFamily("r3_store_fallbacks",
                                  "Lookups answered in-process because Redis was unavailable",
                                  value=self.stats.fallbacks)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("r3_requests", "HTTP requests", ["endpoint", "status"],
                                registry=self.registry)
        self.items = Counter("r3_items", "Items scored", ["endpoint", "backend"],
                             registry=self.registry)
        self.latency = Histogram("r3_request_latency_seconds", "Request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)

    def watch_store(self, stats: StoreStats) -> None:
        self.registry.register(StoreCollector(stats))
