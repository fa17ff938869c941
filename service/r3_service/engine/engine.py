"""The scoring engine: admit a request on its model queues, resolve its items, hand them to the
chosen backend. It assembles the parts (model pool, backends, classifier, store, resolver) from
the settings and holds no scoring logic of its own.

Every model runs behind a scheduler that owns it on one thread: the event loop never blocks on a
forward pass, and concurrent requests' texts share batches. Backends naming the same model share
one scheduler (`ModelPool`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Sequence
from typing import cast

import torch

from r3_service.engine.admission import Admission, admit, demand
from r3_service.engine.backends import RewardBackend, build_backends
from r3_service.engine.observe import observe
from r3_service.engine.pool import ModelPool, describe_model
from r3_service.engine.queueing import TENANT
from r3_service.engine.resolve import RawItem, Resolver
from r3_service.metrics import Metrics
from r3_service.models.embedding import Pooling
from r3_service.qtype import build_classifier
from r3_service.qtype.base import Embed, QueryTypeClassifier
from r3_service.qtype.llm import LlmClassifier
from r3_service.rule.features import GENERIC_STOP_STRINGS
from r3_service.rule.reward import Scored
from r3_service.rule.templates import TEMPLATES
from r3_service.settings import DEFAULT_MODEL, Settings
from r3_service.store.stores import MemoryStore, QueryStore


class UnknownBackend(ValueError):
    def __init__(self, name: str, valid: Sequence[str]) -> None:
        super().__init__(f"unknown backend {name!r}; valid: {', '.join(valid)}")


class RewardEngine:
    def __init__(self, settings: Settings, store: QueryStore, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics or Metrics()
        self.metrics.watch_store(store.stats)
        self.metrics.watch_cache(store.memory.cache)
        self.pool = ModelPool(settings, self.metrics)
        self.backends, self._queues = build_backends(settings, self.pool)
        needed = any(backend.uses_query_type for backend in self.backends.values())
        self.classifier = self._classifier() if needed and settings.qtype_classifier != "none" else None
        template = TEMPLATES[settings.chat_template].stop_strings if settings.chat_template else ()
        self.stop_strings: tuple[str, ...] = GENERIC_STOP_STRINGS + template
        self.resolver = Resolver(store, self.classifier, default_query_type=settings.default_query_type,
                                 stop_strings=self.stop_strings if settings.stop_strings else None)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> RewardEngine:
        memory = MemoryStore(settings.memory_store_size, settings.memory_store_bytes)
        store = QueryStore(memory, settings.redis_url, timeout_s=settings.redis_timeout_ms / 1000,
                           retry_s=settings.redis_retry_s)
        return cls(settings, store, metrics)

    def _classifier(self) -> QueryTypeClassifier:
        """The learned head reads the packaged MiniLM through a scheduler of the pooling it was
        trained on: the same loaded weights as the R3 backends that use MiniLM."""
        s = self.settings

        def embed_for(pooling: str) -> Embed:
            scheduler = self.pool.embedding(DEFAULT_MODEL, None, cast(Pooling, pooling))

            def embed(texts: list[str]) -> Awaitable[torch.Tensor]:
                return scheduler.run(texts, [True] * len(texts))

            return embed

        # `learned`, and `llm`'s fallback, read MiniLM; `rules` never loads it.
        classifier = build_classifier(
            s.qtype_classifier, embed_for=embed_for if s.qtype_classifier != "rules" else None,
            model_name=DEFAULT_MODEL, llm_url=s.qtype_llm_url,
            llm_model=s.qtype_llm_model, llm_api_key=s.qtype_llm_api_key, timeout_s=s.qtype_llm_timeout_s)
        if isinstance(classifier, LlmClassifier):
            self.metrics.watch_llm(classifier.stats)
        return classifier

    def start(self) -> None:
        """Start the batching loops; call from the event loop that will serve requests."""
        self.pool.start()

    def backend(self, name: str | None) -> RewardBackend:
        """The backend called `name` (None: the default), or UnknownBackend naming the valid ones."""
        name = name or self.settings.default_backend
        if name not in self.backends:
            raise UnknownBackend(name, list(self.backends))
        return self.backends[name]

    async def score(self, items: Sequence[RawItem], backend: RewardBackend,
                    admission: Admission | None = None) -> list[Scored]:
        """Rewards in item order, their distributions recorded in the metrics (every route and
        the Ray handle score here). Without an `admission` (from `admit`, which the HTTP
        middleware takes before the route runs), admits the request itself: QueueFull before any
        work when it does not fit. The admission is released when the request is answered."""
        admission = admission or self.admit(demand(items), backend)
        TENANT.set(admission.tenant)  # this request's task: its texts queue under its tenant
        try:
            resolved = await self.resolver.resolve(items, classify=backend.uses_query_type)
            results = await backend.score(resolved)
        finally:
            admission.release()
        observe(self.metrics, backend.name, resolved, results)
        return results

    def admit(self, texts: Collection[str], backend: RewardBackend, tenant: str = "") -> Admission:
        """Hold the tokens of `texts` (a request's `demand`) on each model queue of `backend` for
        `tenant` (an API key's name), or raise QueueFull.
        The classifier's queue is not charged: what it embeds (queries of unknown type) is
        already counted on the backend's own queues."""
        return admit(self._queues[backend.name], texts, tenant)

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
                         "embedding_cache_size": self.settings.embedding_cache_size,
                         "embedding_cache_bytes": self.settings.embedding_cache_bytes},
        }

    def models(self) -> list[dict[str, object]]:
        """Each loaded model with its batching limits (the queue bound may have been measured)."""
        return [{**describe_model(s.model), "max_batch_tokens": s.limits.max_tokens,
                 "max_batch_size": s.limits.max_size, "max_queue_tokens": s.limits.max_queue_tokens}
                for s in self.pool.schedulers.values()]

    async def close(self) -> None:
        if self.classifier is not None:
            await self.classifier.aclose()
        await self.pool.close()
        await self.store.close()
