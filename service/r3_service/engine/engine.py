"""The scoring engine: clean texts, resolve query types, embed each distinct text once, combine.

Embedding goes through the scheduler, which owns the model on one thread: the event loop never
blocks on a forward pass, and requests' texts share batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from r3_service.backends.embedding import EmbeddingModel
from r3_service.backends.r3 import PRESETS, Preset, ResolvedItem, RuleParams, Scored, score
from r3_service.backends.templates import TEMPLATES, extract_query
from r3_service.backends.text import GENERIC_STOP_STRINGS, clean_response
from r3_service.engine.scheduler import BatchLimits, EmbeddingScheduler
from r3_service.metrics import Metrics
from r3_service.querytypes import QueryType
from r3_service.settings import Settings
from r3_service.store.records import QueryRecord, clean_reference, query_key
from r3_service.store.stores import MemoryStore, QueryStore


@dataclass(frozen=True)
class RawItem:
    """One item as a caller sent it; `stop_strings` adds role prefixes of a detected template."""

    query: str
    response: str
    reference: str | None = None
    query_type: QueryType | None = None
    stop_strings: tuple[str, ...] = field(default=())


class UnknownBackend(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown backend {name!r}; valid: {', '.join(PRESETS)}")


def batch_limits(settings: Settings, model: EmbeddingModel) -> BatchLimits:
    on_gpu = model.device.type == "cuda"
    return BatchLimits(
        max_tokens=settings.max_batch_tokens or (32768 if on_gpu else 2048),
        max_size=settings.max_batch_size or (1024 if on_gpu else 256),
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue=settings.max_queue_items,
    )


class RewardEngine:
    def __init__(self, settings: Settings, model: EmbeddingModel, store: QueryStore,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.model = model
        self.store = store
        self.metrics = metrics or Metrics()
        self.metrics.watch_store(store.stats)
        self.scheduler = EmbeddingScheduler(model, batch_limits(settings, model), self.metrics,
                                            cache_size=settings.embedding_cache_size,
                                            tokenizer_threads=settings.tokenizer_threads)
        in_range = settings.relevance_in_range or ((0.0, 1.0) if model.normalize else (0.0, 3.5))
        self.params = RuleParams(
            relevance_in_range=in_range,
            relevance_out_range=(0.0, settings.max_rollout_tokens / 100.0),
            lppo_target_length=settings.lppo_target_length,
        )
        template = TEMPLATES[settings.chat_template].stop_strings if settings.chat_template else ()
        self.stop_strings: tuple[str, ...] = GENERIC_STOP_STRINGS + template

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> RewardEngine:
        model = EmbeddingModel(settings.model, normalize=settings.normalize, device=settings.device,
                               dtype=settings.dtype, compile=settings.compile)
        store = QueryStore(MemoryStore(settings.memory_store_size), settings.redis_url,
                           timeout_s=settings.redis_timeout_ms / 1000, retry_s=settings.redis_retry_s)
        return cls(settings, model, store, metrics)

    def start(self) -> None:
        """Start the batching loop; call from the event loop that will serve requests."""
        self.scheduler.start()

    def preset(self, name: str | None) -> Preset:
        name = name or self.settings.backend
        if name not in PRESETS:
            raise UnknownBackend(name)
        return PRESETS[name]

    async def score(self, items: Sequence[RawItem], backend: str | None = None) -> list[Scored]:
        preset = self.preset(backend)
        resolved = [preset.prepare(item) for item in await self._resolve(items)]
        relevance = await self._relevance(preset, resolved)
        return [score(preset, item, s, self.params) for item, s in zip(resolved, relevance, strict=True)]

    def _clean(self, response: str, extra_stop_strings: tuple[str, ...]) -> str:
        if not self.settings.stop_strings:
            return response.strip()
        return clean_response(response, self.stop_strings + extra_stop_strings)

    async def _resolve(self, items: Sequence[RawItem]) -> list[ResolvedItem]:
        """Query type and reference: the request's own → the store → the default (or none)."""
        queries = [extract_query(item.query) for item in items]
        keys = [query_key(query) if item.query_type is None or clean_reference(item.reference) is None
                else None for item, query in zip(items, queries, strict=True)]
        distinct = sorted({key for key in keys if key is not None})
        found = dict(zip(distinct, await self.store.get_many(distinct), strict=True)) if distinct else {}
        return [self._resolve_one(item, query, found.get(key) or QueryRecord())
                for item, query, key in zip(items, queries, keys, strict=True)]

    def _resolve_one(self, item: RawItem, query: str, stored: QueryRecord) -> ResolvedItem:
        if item.query_type is not None:
            query_type, type_source = item.query_type, "request"
        elif stored.query_type is not None:
            query_type, type_source = stored.query_type, "cache"
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

    async def _relevance(self, preset: Preset, items: list[ResolvedItem]) -> list[float | None]:
        """S for every item that needs one; each distinct text is embedded once, and queries and
        references (which recur across a group and across steps) may come from the cache."""
        pairs = [preset.relevance_pair(item) for item in items]
        cacheable: dict[str, bool] = {}  # each distinct text, in first-seen order
        for pair, item in zip(pairs, items, strict=True):
            if pair is not None:
                cacheable[pair[1]] = True
                cacheable.setdefault(item.response, False)
        if not cacheable:
            return [None] * len(items)
        embeddings = await self.scheduler.embed(list(cacheable), list(cacheable.values()))
        texts = {text: index for index, text in enumerate(cacheable)}
        wanted = [(texts[p[1]], texts[item.response]) for p, item in zip(pairs, items, strict=True)
                  if p is not None]
        left, right = (torch.tensor(side) for side in zip(*wanted, strict=True))
        dots = iter((embeddings[left] * embeddings[right]).sum(dim=-1).tolist())
        return [next(dots) if pair is not None else None for pair in pairs]

    def info(self) -> dict[str, object]:
        return {
            "backend": self.settings.backend,
            "backends": {name: preset.description for name, preset in PRESETS.items()},
            "model": self.model.info.model,
            "model_path": self.model.info.path,
            "device": self.model.info.device,
            "dtype": self.model.info.dtype,
            "compiled": self.model.info.compiled,
            "embedding_dim": self.model.info.dim,
            "normalize": self.model.normalize,
            "max_length": self.model.max_length,
            "truncation": "left",
            "relevance_in_range": list(self.params.relevance_in_range),
            "relevance_out_range": list(self.params.relevance_out_range),
            "max_rollout_tokens": self.settings.max_rollout_tokens,
            "lppo_target_length": self.settings.lppo_target_length,
            "stop_strings": list(self.stop_strings) if self.settings.stop_strings else [],
            "chat_template": self.settings.chat_template,
            "default_query_type": self.settings.default_query_type,
            "store": self.store.kind,
            "batching": {"max_batch_tokens": self.scheduler.limits.max_tokens,
                         "max_batch_size": self.scheduler.limits.max_size,
                         "max_wait_ms": self.settings.max_wait_ms,
                         "max_queue_items": self.scheduler.limits.max_queue,
                         "embedding_cache_size": self.settings.embedding_cache_size},
        }

    async def close(self) -> None:
        await self.scheduler.close()
        await self.store.close()
