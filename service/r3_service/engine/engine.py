"""The scoring engine: clean texts, resolve query types, hand items to the requested backend.

Every model runs behind a scheduler that owns it on one thread: the event loop never blocks on a
forward pass, and concurrent requests' texts share batches. Backends naming the same model share
one scheduler (`ModelPool`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch

from r3_service.backends.classifier import QueryTypeClassifier, build_classifier
from r3_service.backends.embedding import EmbeddingModel
from r3_service.backends.kinds import (
    EnsembleBackend,
    Member,
    R3Backend,
    RewardBackend,
    RewardModelBackend,
    RunningMoments,
)
from r3_service.backends.r3 import PRESETS, ResolvedItem, RuleParams, Scored
from r3_service.backends.reward_model import RewardModel
from r3_service.backends.templates import TEMPLATES, extract_query
from r3_service.backends.text import GENERIC_STOP_STRINGS, clean_response
from r3_service.engine.scheduler import BatchLimits, BatchModel, EmbeddingScheduler, QueueFull
from r3_service.metrics import Metrics
from r3_service.querytypes import QueryType
from r3_service.settings import DEFAULT_MODEL, EnsembleSpec, R3BackendSpec, RewardModelSpec, Settings
from r3_service.store.records import QueryRecord, clean_reference, query_key
from r3_service.store.stores import MemoryStore, QueryStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawItem:
    """One item as a caller sent it; `stop_strings` adds role prefixes of a detected template."""

    query: str
    response: str
    reference: str | None = None
    query_type: QueryType | None = None
    stop_strings: tuple[str, ...] = field(default=())


RECENT_REQUESTS = 64  # whose bytes per text estimate an unread body's texts
PRIOR_BYTES_PER_TEXT = 1000.0  # before any request: a text of ~200 tokens, in JSON


class Admission:
    """Texts held on model queues for one request in flight; released once, however often asked."""

    def __init__(self, queues: Sequence[EmbeddingScheduler], texts: int) -> None:
        for index, queue in enumerate(queues):
            try:
                queue.hold(texts)
            except QueueFull:
                for held in queues[:index]:
                    held.release(texts)
                raise
        self._queues, self.texts = tuple(queues), texts

    def release(self) -> None:
        for queue in self._queues:
            queue.release(self.texts)
        self._queues = ()


@dataclass(frozen=True)
class BodySize:
    """A request body's size in bytes (Content-Length) and the endpoint it was sent to."""

    endpoint: str
    size: int


class UnknownBackend(ValueError):
    def __init__(self, name: str, valid: Sequence[str]) -> None:
        super().__init__(f"unknown backend {name!r}; valid: {', '.join(valid)}")


def batch_limits(settings: Settings, model: BatchModel) -> BatchLimits:
    on_gpu = model.device.type == "cuda"
    max_tokens = settings.max_batch_tokens or (32768 if on_gpu else 2048)
    max_size = settings.max_batch_size or (1024 if on_gpu else 256)
    return BatchLimits(
        max_tokens=max_tokens, max_size=max_size, max_wait_s=settings.max_wait_ms / 1000,
        max_queue=settings.max_queue_items or measured_queue_bound(model, max_tokens, max_size,
                                                                   settings.queue_seconds),
    )


MEASURED_PASSES = 3


def measured_queue_bound(model: BatchModel, max_tokens: int, max_size: int, seconds: float) -> int:
    """Distinct texts the model clears in `seconds`: a full batch of 64-token texts, timed after
    one warm-up pass (the fastest of MEASURED_PASSES). Never below `max_size`, so a batch-sized
    request always fits."""
    length = min(64, model.info.max_length)
    count = max(1, min(max_size, max_tokens // length))
    batch = [[1000 + (row + i) % 1000 for i in range(length)] for row in range(count)]
    model.forward(batch)
    fastest = math.inf
    for _ in range(MEASURED_PASSES):  # the fastest pass: what the machine does undisturbed
        started = time.perf_counter()
        model.forward(batch)
        fastest = min(fastest, time.perf_counter() - started)
    bound = max(max_size, int(seconds * count / max(fastest, 1e-6)))
    log.info("queue bound for %s: %d texts (%.1f s of work at the measured rate)",
             model.info.model, bound, seconds)
    return bound


def describe_model(model: BatchModel) -> dict[str, object]:
    info = model.info
    return {"model": info.model, "model_path": info.path, "device": info.device, "dtype": info.dtype,
            "compiled": info.compiled, "embedding_dim": info.dim, "normalize": info.normalize,
            "max_length": info.max_length,
            "truncation": "left" if isinstance(model, EmbeddingModel) else "right"}


class ModelPool:
    """Each model loaded once, with one batching scheduler: backends naming the same model share
    its weights, its queue and its embedding cache."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.schedulers: dict[tuple[object, ...], EmbeddingScheduler] = {}
        metrics.queue_depth.set_function(lambda: sum(s.queued for s in self.schedulers.values()))

    def embedding(self, name: str, normalize: bool | None) -> EmbeddingScheduler:
        s = self.settings
        return self._shared(("embedding", name, normalize), lambda: EmbeddingModel(
            name, normalize=normalize, device=s.device, dtype=s.dtype, compile=s.compile))

    def reward_model(self, spec: RewardModelSpec) -> EmbeddingScheduler:
        s = self.settings
        return self._shared(("reward-model", spec.model, spec.input_format, spec.max_length, spec.label),
                            lambda: RewardModel(spec.model, input_format=spec.input_format,
                                                max_length=spec.max_length, label=spec.label,
                                                device=s.device, dtype=s.dtype))

    def _shared(self, key: tuple[object, ...], load: Callable[[], BatchModel]) -> EmbeddingScheduler:
        if key not in self.schedulers:
            model = load()
            s = self.settings
            self.schedulers[key] = EmbeddingScheduler(model, batch_limits(s, model), self.metrics,
                                                      cache_size=s.embedding_cache_size,
                                                      tokenizer_threads=s.tokenizer_threads)
        return self.schedulers[key]


Queues = tuple[EmbeddingScheduler, ...]


def build_backends(settings: Settings, pool: ModelPool) -> tuple[dict[str, RewardBackend], dict[str, Queues]]:
    """The configured backends, and the model queues each one's requests are admitted to;
    ensembles after the backends they combine."""
    backends: dict[str, RewardBackend] = {}
    queues: dict[str, Queues] = {}
    ordered = sorted(settings.backends.items(), key=lambda pair: isinstance(pair[1], EnsembleSpec))
    for name, spec in ordered:
        if isinstance(spec, R3BackendSpec):
            backends[name], queues[name] = r3_backend(name, spec, settings, pool)
        elif isinstance(spec, RewardModelSpec):
            scheduler = pool.reward_model(spec)
            backends[name], queues[name] = RewardModelBackend(name, scheduler.embed, {
                **describe_model(scheduler.model), "input_format": spec.input_format, "label": spec.label,
            }), (scheduler,)
        else:
            backends[name] = EnsembleBackend(name, [
                Member(backends[m.backend], m.weight, m.standardize, m.mean, m.std,
                       RunningMoments() if m.standardize == "running" else None)
                for m in spec.members])
            queues[name] = tuple(dict.fromkeys(q for m in spec.members for q in queues[m.backend]))
    return backends, queues


def r3_backend(name: str, spec: R3BackendSpec, settings: Settings,
               pool: ModelPool) -> tuple[R3Backend, Queues]:
    preset = PRESETS[spec.preset]
    model_name = spec.model or settings.model
    normalize = spec.normalize if spec.normalize is not None else settings.normalize
    # A rule without relevance never loads a model.
    scheduler = pool.embedding(model_name, normalize) if preset.uses_relevance else None
    normalized = scheduler.model.info.normalize if scheduler else bool(normalize)
    in_range = spec.relevance_in_range or settings.relevance_in_range or (
        (0.0, 1.0) if normalized else (0.0, 3.5))
    params = RuleParams(
        relevance_in_range=in_range,
        relevance_out_range=(0.0, (spec.max_rollout_tokens or settings.max_rollout_tokens) / 100.0),
        lppo_target_length=spec.lppo_target_length or settings.lppo_target_length,
    )
    if scheduler is None:
        return R3Backend(name, preset, params, _no_embedding, {}), ()
    return R3Backend(name, preset, params, scheduler.embed, describe_model(scheduler.model)), (scheduler,)


def demand(items: Sequence[RawItem]) -> int:
    """The distinct texts a request will embed on each model it uses, estimated before any work:
    every response, a closed query's reference, an open query's query, and both the query (to
    classify it) and any reference when the type is not given. A reward model embeds one pair per
    item, no more than this."""
    texts: set[str] = set()
    for item in items:
        texts.add(item.response)
        if item.reference and item.query_type != "open":
            texts.add(item.reference)
        if item.query_type != "closed" or not item.reference:
            texts.add(item.query)
    return len(texts)


async def _no_embedding(texts: Sequence[str], cacheable: Sequence[bool]) -> torch.Tensor:
    raise AssertionError("a preset without relevance asked for embeddings")


class RewardEngine:
    def __init__(self, settings: Settings, store: QueryStore, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics or Metrics()
        self.metrics.watch_store(store.stats)
        self.pool = ModelPool(settings, self.metrics)
        self.backends, self._queues = build_backends(settings, self.pool)
        needed = any(backend.uses_query_type for backend in self.backends.values())
        self._classifier_queues: Queues = ()
        self._bytes_per_text: dict[str, deque[float]] = {}  # by endpoint, of recent requests
        self.classifier = self._classifier() if needed and settings.qtype_classifier != "none" else None
        template = TEMPLATES[settings.chat_template].stop_strings if settings.chat_template else ()
        self.stop_strings: tuple[str, ...] = GENERIC_STOP_STRINGS + template

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> RewardEngine:
        store = QueryStore(MemoryStore(settings.memory_store_size), settings.redis_url,
                           timeout_s=settings.redis_timeout_ms / 1000, retry_s=settings.redis_retry_s)
        return cls(settings, store, metrics)

    def _classifier(self) -> QueryTypeClassifier:
        """The learned head reads the packaged MiniLM through its scheduler: shared with the R3
        backends (batches and the embedding cache) when they use MiniLM too."""
        s = self.settings
        embed = None
        if s.qtype_classifier != "rules":  # `learned`, and `llm`'s fallback, read MiniLM
            scheduler = self.pool.embedding(DEFAULT_MODEL, None)
            self._classifier_queues = (scheduler,)

            def embed(texts: list[str]) -> Awaitable[torch.Tensor]:
                return scheduler.embed(texts, [True] * len(texts))

        return build_classifier(
            s.qtype_classifier, embed=embed, model_name=DEFAULT_MODEL, llm_url=s.qtype_llm_url,
            llm_model=s.qtype_llm_model, llm_api_key=s.qtype_llm_api_key, timeout_s=s.qtype_llm_timeout_s)

    def _current_classifiers(self) -> set[str]:
        """Classifier ids whose stored answers are still good (a new version re-classifies)."""
        if self.classifier is None:
            return set()
        fallback = getattr(self.classifier, "fallback", None)
        return {self.classifier.id, *([fallback.id] if fallback is not None else [])}

    def start(self) -> None:
        """Start the batching loops; call from the event loop that will serve requests."""
        for scheduler in self.pool.schedulers.values():
            scheduler.start()

    def backend(self, name: str | None) -> RewardBackend:
        name = name or self.settings.default_backend
        if name not in self.backends:
            raise UnknownBackend(name, list(self.backends))
        return self.backends[name]

    async def score(self, items: Sequence[RawItem], backend: str | None = None, body: BodySize | None = None,
                    early: Admission | None = None) -> list[Scored]:
        """Rewards in item order. Raises QueueFull before any work when the request does not fit
        on a model's queue; `early` (from `admit_early`) is swapped for the exact admission, and
        `body` teaches `admit_early` its bytes per text."""
        chosen = self.backend(backend)
        admission = self._admit(chosen, items, body, early)
        try:
            return await chosen.score(await self._resolve(items, classify=chosen.uses_query_type))
        finally:
            admission.release()

    def admit_early(self, body: BodySize) -> Admission:
        """Admit a request on the default backend's queues before its body is read, or raise
        QueueFull: under a burst a refusal then costs no parsing, and requests still being read
        or parsed count against the bound. Parsed, the request is admitted exactly by `score`.

        The texts are estimated low, at the most bytes per text of its endpoint's recent
        requests: held capacity or a refusal never rests on a guess larger than the request
        (mixed traffic of short and long texts only makes the estimate less useful)."""
        recent = self._bytes_per_text.get(body.endpoint)
        ratio = max(recent) if recent else PRIOR_BYTES_PER_TEXT
        return Admission(self._queues_of(self.backend(None)), max(1, int(body.size / ratio)))

    def _queues_of(self, backend: RewardBackend) -> Queues:
        """Every model queue a request to `backend` uses (the classifier's too)."""
        queues = self._queues[backend.name]
        if backend.uses_query_type:
            queues = tuple(dict.fromkeys((*queues, *self._classifier_queues)))
        return queues

    def _admit(self, backend: RewardBackend, items: Sequence[RawItem], body: BodySize | None,
               early: Admission | None) -> Admission:
        texts = demand(items)
        if body is not None and texts:
            recent = self._bytes_per_text.setdefault(body.endpoint, deque(maxlen=RECENT_REQUESTS))
            recent.append(body.size / texts)
        if early is not None:
            early.release()
        return Admission(self._queues_of(backend), texts)

    def _clean(self, response: str, extra_stop_strings: tuple[str, ...]) -> str:
        if not self.settings.stop_strings:
            return response.strip()
        return clean_response(response, self.stop_strings + extra_stop_strings)

    async def _resolve(self, items: Sequence[RawItem], classify: bool = True) -> list[ResolvedItem]:
        """Query type and reference: the request's own → the store → the classifier → the default."""
        queries = [extract_query(item.query) for item in items]
        keys = [query_key(query) if item.query_type is None or clean_reference(item.reference) is None
                else None for item, query in zip(items, queries, strict=True)]
        distinct = sorted({key for key in keys if key is not None})
        found = dict(zip(distinct, await self.store.get_many(distinct), strict=True)) if distinct else {}
        if classify and self.classifier is not None:
            found |= await self._classify(items, queries, keys, found)
        return [self._resolve_one(item, query, found.get(key) or QueryRecord())
                for item, query, key in zip(items, queries, keys, strict=True)]

    async def _classify(self, items: Sequence[RawItem], queries: list[str], keys: list[str | None],
                        found: dict[str, QueryRecord | None]) -> dict[str, QueryRecord]:
        """Type the queries that neither the request nor the store (by a current classifier, or a
        dataset) types, and write the answers back to the store."""
        assert self.classifier is not None
        current = self._current_classifiers()
        unknown: dict[str, str] = {}  # key -> query, first seen
        for item, query, key in zip(items, queries, keys, strict=True):
            stored = found.get(key) if key is not None else None
            if key is None or item.query_type is not None or key in unknown:
                continue
            if stored is None or stored.query_type is None or (
                    stored.classified_by is not None and stored.classified_by not in current):
                unknown[key] = query
        if not unknown:
            return {}
        try:
            labels = await self.classifier.label(list(unknown.values()))
        except Exception:  # the classifier is an aid: scoring goes on with the default type
            log.exception("query-type classifier failed on %d queries; using the default type", len(unknown))
            return {}
        answers = {key: QueryRecord(label.query_type, (found.get(key) or QueryRecord()).reference,
                                    label.classified_by)
                   for key, label in zip(unknown, labels, strict=True)}
        await self.store.put_many([(unknown[key], record) for key, record in answers.items()])
        return answers

    def _resolve_one(self, item: RawItem, query: str, stored: QueryRecord) -> ResolvedItem:
        if item.query_type is not None:
            query_type, type_source = item.query_type, "request"
        elif stored.query_type is not None:
            query_type, type_source = stored.query_type, "classifier" if stored.classified_by else "cache"
        else:
            query_type, type_source = self.settings.default_query_type, "default"
        reference, reference_source = clean_reference(item.reference), "request"
        if reference is None:
            reference, reference_source = stored.reference, "cache"
        return ResolvedItem(
            query=query,
            response=self._clean(item.response, item.stop_strings),
            reference=reference,
            query_type=query_type,
            query_type_source=type_source,
            reference_source=reference_source if reference is not None else None,
        )

    def info(self) -> dict[str, object]:
        return {
            "default_backend": self.settings.default_backend,
            "backends": {name: backend.describe() for name, backend in self.backends.items()},
            "max_rollout_tokens": self.settings.max_rollout_tokens,
            "stop_strings": list(self.stop_strings) if self.settings.stop_strings else [],
            "chat_template": self.settings.chat_template,
            "default_query_type": self.settings.default_query_type,
            "query_type_classifier": self.classifier.id if self.classifier is not None else None,
            "store": self.store.kind,
            "batching": {"max_wait_ms": self.settings.max_wait_ms,
                         "embedding_cache_size": self.settings.embedding_cache_size},
        }

    def models(self) -> list[dict[str, object]]:
        """Each loaded model with its batching limits (the queue bound may have been measured)."""
        return [{**describe_model(s.model), "max_batch_tokens": s.limits.max_tokens,
                 "max_batch_size": s.limits.max_size, "max_queue_items": s.limits.max_queue}
                for s in self.pool.schedulers.values()]

    async def close(self) -> None:
        if self.classifier is not None:
            await self.classifier.aclose()
        for scheduler in self.pool.schedulers.values():
            await scheduler.close()
        await self.store.close()
