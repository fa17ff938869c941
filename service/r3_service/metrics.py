"""Prometheus metrics, one registry per app so several apps can live in one process (tests)."""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from r3_service import allocator
from r3_service.caches import LruCache, module_caches

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
# What was scored, to watch for reward hacking. Rewards: R3's lie in about [0, 5] (LI and the
# closed branch's f reach max_rollout_tokens / 100), a reward model's or a standardised ensemble's
# may be negative. Relevance: a cosine lies in [-1, 1], a raw dot product (Contriever) up to ~3.5.
# A histogram with negative buckets has no `_sum` (a sum that can fall breaks rate()), so the
# reward's sum is also kept as two counters, by sign.
REWARD_BUCKETS = (-5.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0,
                  7.5, 10.0)
RELEVANCE_BUCKETS = (-0.5, -0.25, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.5, 2.0,
                     2.5, 3.0, 3.5, 4.0)
LENGTH_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0)
SHARE_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)  # RP
COPY_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)  # 0.5: the dashboard's "mostly copied"


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


class ScoreParts(Protocol):
    """What the metrics read of one scored item (`r3_service.rule.reward.Scored`)."""

    @property
    def reward(self) -> float: ...

    @property
    def length_incentive(self) -> float: ...

    @property
    def repetition_penalty(self) -> float: ...

    @property
    def relevance(self) -> float | None: ...

    @property
    def query_type(self) -> str: ...


@dataclass(frozen=True)
class ScoreSeries:
    """One (backend, query type)'s children of the score metrics, looked up once."""

    reward: Histogram
    positive: Counter
    negative: Counter
    length_incentive: Histogram
    repetition_penalty: Histogram
    copy_overlap: Histogram


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


class MemoryCollector(Collector):
    """Where the process's memory is, read at scrape time: each cache's estimated bytes and
    entries, the C allocator's account, CPython's allocated blocks (and traced bytes when
    tracemalloc runs). The process's RSS is `process_resident_memory_bytes`."""

    def __init__(self) -> None:
        self.caches: list[LruCache] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        caches = [*self.caches, *module_caches()]
        size = GaugeMetricFamily("r3_cache_bytes", "Estimated bytes held by each cache (bounded in bytes "
                                 "and entries)", labels=["cache"])
        entries = GaugeMetricFamily("r3_cache_entries", "Entries held by each cache", labels=["cache"])
        for cache in caches:
            size.add_metric([cache.name], cache.bytes)
            entries.add_metric([cache.name], len(cache))
        yield size
        yield entries
        heap = allocator.heap()
        if heap:
            family = GaugeMetricFamily("r3_allocator_bytes", "glibc malloc's account: arena (from the "
                                       "system, all arenas), in_use and free within them, mmapped",
                                       labels=["kind"])
            for kind, value in heap.items():
                family.add_metric([kind], value)
            yield family
        yield GaugeMetricFamily("r3_python_allocated_blocks", "CPython objects' memory blocks allocated "
                                "(sys.getallocatedblocks)", value=sys.getallocatedblocks())
        if tracemalloc.is_tracing():
            yield GaugeMetricFamily("r3_python_traced_bytes", "Bytes CPython allocated, as traced by "
                                    "tracemalloc (R3_TRACEMALLOC)", value=tracemalloc.get_traced_memory()[0])


class TenantCollector(Collector):
    """Each tenant's queue depth, held tokens and weight, read at scrape time."""

    def __init__(self, weights: dict[str, float], depths: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self.weights = weights
        self.depths = depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queued = GaugeMetricFamily("r3_tenant_queue_depth", "Texts waiting for a batch, per tenant",
                                   labels=["tenant"])
        held = GaugeMetricFamily("r3_tenant_held_tokens", "Tokens held by a tenant's requests in flight",
                                 labels=["tenant"])
        weight = GaugeMetricFamily("r3_tenant_weight", "A tenant's configured weight", labels=["tenant"])
        for tenant, (depth, tokens) in sorted(self.depths().items()):
            queued.add_metric([tenant], depth)
            held.add_metric([tenant], tokens)
            weight.add_metric([tenant], self.weights.get(tenant, 1.0))
        yield from (queued, held, weight)


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
        self.admitted_tokens = Gauge("r3_admitted_tokens", "Tokens held by admitted requests in flight "
                                     "(the queue bound's measure), summed over models",
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
        # Tenants (API keys, by their configured name; "" without keys)
        self.tenant_rejected = Counter("r3_tenant_rejections", "Requests refused with 429, per tenant",
                                       ["tenant"], registry=self.registry)
        self.tenant_admitted_tokens = Counter("r3_tenant_admitted_tokens", "Tokens admitted, per tenant "
                                              "(summed over model queues)", ["tenant"],
                                              registry=self.registry)
        self.dropped = Counter("r3_dropped_texts", "Queued texts dropped because their clients left",
                               registry=self.registry)
        self.oom_splits = Counter("r3_oom_splits", "Batches split after a CUDA out-of-memory error",
                                  registry=self.registry)
        # What was scored, per backend and query type (see `observe_scores`)
        parts = ["backend", "query_type"]
        self.reward = Histogram("r3_reward", "Rewards returned", parts,
                                buckets=REWARD_BUCKETS, registry=self.registry)
        self.relevance = Histogram("r3_relevance", "Relevance S of the items that have one", parts,
                                   buckets=RELEVANCE_BUCKETS, registry=self.registry)
        self.length_incentive = Histogram("r3_length_incentive", "Length incentive LI (word tokens / 100)",
                                          parts, buckets=LENGTH_BUCKETS, registry=self.registry)
        self.repetition_penalty = Histogram("r3_repetition_penalty", "Repetition penalty RP (1: no "
                                            "repeated trigram)", parts, buckets=SHARE_BUCKETS,
                                            registry=self.registry)
        self.copy_overlap = Histogram("r3_copy_overlap", "Share of the response's word tokens copied "
                                      "from the query in 4-grams", parts, buckets=COPY_BUCKETS,
                                      registry=self.registry)
        self.reward_magnitude = Counter("r3_reward_magnitude", "Sum of |reward| by sign; mean reward = "
                                        "(positive - negative) / r3_reward_count", [*parts, "sign"],
                                        registry=self.registry)
        self.empty = Counter("r3_empty_responses", "Responses empty once cleaned", ["backend"],
                             registry=self.registry)
        # Hack detectors (rule.guards) on every scored response, whatever the backend: filler only
        # where a guarded backend ran its head; the rest (echo, input_echo, restate, repeat) always.
        self.scored_tokens = Counter("r3_scored_tokens", "Word tokens of the scored responses", ["backend"],
                                     registry=self.registry)
        self.unpaid_tokens = Counter("r3_unpaid_tokens", "Word tokens a detector marks (rule.guards), by "
                                     "reason; share = rate(this) / rate(r3_scored_tokens)",
                                     ["backend", "reason"], registry=self.registry)
        self.flagged_responses = Counter("r3_flagged_responses", "Responses with any token a detector "
                                         "marks, by reason; share = rate(this) / rate(r3_reward_count)",
                                         ["backend", "reason"], registry=self.registry)
        self._scored: dict[tuple[str, str], ScoreSeries] = {}
        self.memory = MemoryCollector()
        self.registry.register(self.memory)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and the like

    def observe_scores(self, backend: str, scored: Sequence[ScoreParts], copy_overlaps: Sequence[float],
                       empty: int) -> None:
        """One observation per item in each distribution (`copy_overlaps` in item order); a backend
        without relevance gets no relevance series."""
        for item, overlap in zip(scored, copy_overlaps, strict=True):
            labels = (backend, item.query_type)
            series = self._scored.get(labels)
            if series is None:
                series = self._scored[labels] = ScoreSeries(
                    self.reward.labels(*labels), self.reward_magnitude.labels(*labels, "positive"),
                    self.reward_magnitude.labels(*labels, "negative"), self.length_incentive.labels(*labels),
                    self.repetition_penalty.labels(*labels), self.copy_overlap.labels(*labels))
            series.reward.observe(item.reward)
            if item.reward >= 0:
                series.positive.inc(item.reward)
            else:
                series.negative.inc(-item.reward)
            series.length_incentive.observe(item.length_incentive)
            series.repetition_penalty.observe(item.repetition_penalty)
            series.copy_overlap.observe(overlap)
            if item.relevance is not None:
                self.relevance.labels(*labels).observe(item.relevance)
        self.empty.labels(backend).inc(empty)  # 0 too: the series exists once a backend has scored

    def observe_detections(self, backend: str, tokens: int, unpaid: dict[str, int],
                           flagged: dict[str, int]) -> None:
        """One request's detector counts: its responses' tokens, the tokens marked per reason,
        and the responses with any mark per reason (every reason counted, 0 included)."""
        self.scored_tokens.labels(backend).inc(tokens)
        for reason, count in unpaid.items():
            self.unpaid_tokens.labels(backend, reason).inc(count)
            self.flagged_responses.labels(backend, reason).inc(flagged.get(reason, 0))

    def watch_cache(self, cache: LruCache) -> None:
        self.memory.caches.append(cache)

    def watch_tenants(self, weights: dict[str, float],
                      depths: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self.registry.register(TenantCollector(weights, depths))

    def watch_store(self, stats: StoreCounts) -> None:
        self.registry.register(StoreCollector(stats))

    def watch_llm(self, stats: LlmCounts) -> None:
        self.registry.register(LlmCollector(stats))
