"""Prometheus metrics, one registry per app so several apps can live in one process (tests)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class StoreCounts(Protocol):
    hits: int
    misses: int
    errors: int
    fallbacks: int


class LlmCounts(Protocol):
    requests: int
    retries: int
    answered: int
    fallbacks: int


class StoreCollector(Collector):
    """Reads the store's own counters at scrape time, so the store needs no Prometheus import."""

    def __init__(self, stats: StoreCounts) -> None:
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


class LlmCollector(Collector):
    """The `llm` query-type classifier's counters, read at scrape time."""

    def __init__(self, stats: LlmCounts) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("r3_qtype_llm_requests", "HTTP requests to the query-type endpoint, "
                                  "retries included", value=self.stats.requests)
        yield CounterMetricFamily("r3_qtype_llm_retries", "Retried requests to the query-type endpoint",
                                  value=self.stats.retries)
        queries = CounterMetricFamily("r3_qtype_llm_queries", "Queries typed by the llm classifier",
                                      labels=["answered_by"])
        queries.add_metric(["endpoint"], self.stats.answered)
        queries.add_metric(["fallback"], self.stats.fallbacks)
        yield queries


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("r3_requests", "HTTP requests", ["endpoint", "status"],
                                registry=self.registry)
        self.items = Counter("r3_items", "Items scored", ["endpoint", "backend"],
                             registry=self.registry)
        self.latency = Histogram("r3_request_latency_seconds", "Request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        # The batching engine
        self.batch_size = Histogram("r3_batch_size", "Sequences per forward pass",
                                    buckets=SIZE_BUCKETS, registry=self.registry)
        self.real_tokens = Histogram("r3_batch_real_tokens", "Non-padding tokens per forward pass",
                                     buckets=TOKEN_BUCKETS, registry=self.registry)
        self.padded_tokens = Histogram("r3_batch_padded_tokens", "Padded tokens per forward pass",
                                       buckets=TOKEN_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("r3_queue_depth", "Distinct texts queued or computing",
                                 registry=self.registry)
        self.queue_wait_seconds = Histogram("r3_queue_wait_seconds", "Time a text waits for its batch",
                                            buckets=WAIT_BUCKETS, registry=self.registry)
        self.compute_seconds = Histogram("r3_compute_seconds", "Forward pass time per batch",
                                         buckets=WAIT_BUCKETS, registry=self.registry)
        self.dedup = Counter("r3_dedup_hits", "Texts joined to one already queued by another request",
                             registry=self.registry)
        self.cache = Counter("r3_embedding_cache", "Query/reference embedding cache lookups",
                             ["result"], registry=self.registry)
        self.rejected = Counter("r3_queue_rejections", "Requests refused with 429 (queue full)",
                                registry=self.registry)
        self.dropped = Counter("r3_dropped_texts", "Queued texts dropped because their clients left",
                               registry=self.registry)
        self.oom_splits = Counter("r3_oom_splits", "Batches split after a CUDA out-of-memory error",
                                  registry=self.registry)

    def watch_store(self, stats: StoreCounts) -> None:
        self.registry.register(StoreCollector(stats))

    def watch_llm(self, stats: LlmCounts) -> None:
        self.registry.register(LlmCollector(stats))
