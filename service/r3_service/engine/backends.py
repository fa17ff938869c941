"""The reward backends a deployment configures: an R3 preset over an embedding model, a
sequence-classification reward model, and a weighted ensemble of the two.

Backends never touch a model directly: they are handed an `Infer` function (the batching
scheduler of their model), so concurrent requests share batches whichever backend they use.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch

from r3_service.engine.pool import ModelPool, describe_model
from r3_service.engine.scheduler import BatchScheduler
from r3_service.models.filler import FillerHead
from r3_service.rule.guards import Detection, Tokenised, detect, filler_flags, filler_units, tokenise
from r3_service.rule.moments import RunningMoments
from r3_service.rule.reward import PRESETS, Preset, ResolvedItem, RuleParams, Scored, plain, relevance, score
from r3_service.settings import (
    DEFAULT_MODEL,
    PACKAGED_MODEL_RANGE,
    EnsembleSpec,
    R3BackendSpec,
    RewardModelSpec,
    Settings,
)

# Output rows for distinct inputs, in order; the flags say which inputs are worth caching.
Infer = Callable[[Sequence[Hashable], Sequence[bool]], Awaitable[torch.Tensor]]
Queues = tuple[BatchScheduler, ...]


class RewardBackend(Protocol):
    name: str
    uses_relevance: bool
    uses_query_type: bool  # False: an unknown query type need not be classified

    async def score(self, items: list[ResolvedItem]) -> list[Scored]: ...

    def describe(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class FillerDetector:
    """The filler head over the embeddings of its model's scheduler (`Infer`), behind its
    prefilter over the same model's word vectors (`words`)."""

    head: FillerHead
    embed: Infer
    words: Callable[[list[str]], torch.Tensor]

    async def probabilities(self, texts: list[Tokenised], queries: list[str],
                            topic_cap: float) -> list[list[float | None]]:
        """Per response, per sentence: p(generic padding) of its `filler_units` piece, None where
        it cannot be: no piece to read, ruled out by the prefilter, or as close to the item's query as
        `topic_cap` (about the question, not padding that fits any). Each distinct sentence read
        once, and its embedding cached: the same pleasantries recur across a run."""
        sentences = [[text.piece(unit) if unit else None for unit in filler_units(text)] for text in texts]
        distinct = list(dict.fromkeys(s for group in sentences for s in group if s is not None))
        if distinct and self.head.prefilter is not None:
            p_words = self.head.prefilter.probability(await asyncio.to_thread(self.words, distinct))
            distinct = [s for s, keep in zip(distinct, (p_words >= self.head.prefilter_threshold).tolist(),
                                             strict=True) if keep]
        if not distinct:
            return [[None] * len(group) for group in sentences]
        kept = set(distinct)
        # The queries of the responses with a sentence left to read: the head's model embeds them too.
        to_embed = list(dict.fromkeys([*distinct, *(q for q, group in zip(queries, sentences, strict=True)
                                                    if any(s in kept for s in group))]))
        rows = torch.nn.functional.normalize(await self.embed(to_embed, [True] * len(to_embed)), dim=-1)
        row = {text: rows[i] for i, text in enumerate(to_embed)}
        p_filler = dict(zip(distinct, self.head.probability(rows[:len(distinct)]).tolist(), strict=True))
        return [[p_filler[s] if s in kept and float(row[s] @ row[query]) < topic_cap else None
                 for s in group]
                for query, group in zip(queries, sentences, strict=True)]


class R3Backend:
    def __init__(self, name: str, preset: Preset, params: RuleParams, embed: Infer,
                 model: dict[str, object], filler: FillerDetector | None = None) -> None:
        self.name = name
        self.preset = preset
        self.params = params
        self.embed = embed
        self.model = model
        self.filler = filler
        self.uses_relevance = preset.uses_relevance
        self.uses_query_type = preset.uses_query_type

    async def score(self, items: list[ResolvedItem]) -> list[Scored]:
        prepared = [self.preset.prepare(item) for item in items]
        if not self.preset.guarded:
            relevance = await self._relevance(prepared)
            return [score(self.preset, item, s, self.params, s_other)
                    for item, (s, s_other) in zip(prepared, relevance, strict=True)]
        # The whole responses' relevance (what an untouched answer is paid by) in the same batches
        # as the sentences the filler head reads; the paid text's only where the cut moves S.
        detections, relevance = await asyncio.gather(self.detect(prepared), self._relevance(prepared))
        cut = [i for i, d in enumerate(detections) if d.paid_tokens and d.moves_relevance(self.params.guards)]
        if cut:
            paid = await self._relevance([replace(prepared[i], response=detections[i].paid_text())
                                          for i in cut])
            for i, pair in zip(cut, paid, strict=True):
                relevance[i] = pair
        return [score(self.preset, item, s, self.params, s_other, d)
                for item, (s, s_other), d in zip(prepared, relevance, detections, strict=True)]

    async def detect(self, items: list[ResolvedItem]) -> list[Detection]:
        texts = [tokenise(item.response) for item in items]
        guards = self.params.guards
        flags: list[list[bool] | None] = [None] * len(items)
        if self.filler is not None:
            at = self.filler.head.threshold if guards.filler_threshold is None else guards.filler_threshold
            flags = [filler_flags(p, at, guards.filler_margin)
                     for p in await self.filler.probabilities(texts, [item.query for item in items],
                                                              guards.filler_topic_cap)]
        # A reference exempts what it copies from the query only where the rule reads it.
        return [detect(item.query, text, item.reference if item.query_type == "closed" else None,
                       flag, guards)
                for item, text, flag in zip(items, texts, flags, strict=True)]

    async def _relevance(self, items: list[ResolvedItem]) -> list[tuple[float | None, float | None]]:
        """(S of the item's branch, S of the other branch when its reward blends both) for every
        item; each distinct text is embedded once, and queries and references (which recur across
        a group and across steps) may come from the cache."""
        pairs = [(self.preset.relevance_pair(item), self.preset.other_pair(item, self.params))
                 for item in items]
        cacheable: dict[str, bool] = {}  # each distinct text, in first-seen order
        for both, item in zip(pairs, items, strict=True):
            for pair in both:
                if pair is not None:
                    cacheable[pair[1]] = True
                    cacheable.setdefault(item.response, False)
        if not cacheable:
            return [(None, None)] * len(items)
        embeddings = await self.embed(list(cacheable), list(cacheable.values()))
        texts = {text: index for index, text in enumerate(cacheable)}
        wanted = [(texts[pair[1]], texts[item.response]) for both, item in zip(pairs, items, strict=True)
                  for pair in both if pair is not None]
        left, right = (torch.tensor(side) for side in zip(*wanted, strict=True))
        dots = iter(relevance(embeddings[left], embeddings[right]).tolist())
        return [(next(dots) if pair is not None else None, next(dots) if other is not None else None)
                for pair, other in pairs]

    def describe(self) -> dict[str, object]:
        return {
            "kind": "r3", "preset": self.preset.name, "description": self.preset.description,
            **self.model,
            "relevance_in_range": list(self.params.relevance_in_range),
            "relevance_out_range": list(self.params.relevance_out_range),
            "lppo_target_length": self.params.lppo_target_length,
            "soft_branch": list(self.params.soft_branch) if self.params.soft_branch else None,
            **({"guards": asdict(self.params.guards), "filler_head": self.filler.head.model}
               if self.filler is not None else {}),
        }


class RewardModelBackend:
    uses_relevance = False
    uses_query_type = False

    def __init__(self, name: str, infer: Infer, model: dict[str, object]) -> None:
        self.name = name
        self.infer = infer
        self.model = model

    async def score(self, items: list[ResolvedItem]) -> list[Scored]:
        pairs = [(item.query, item.response) for item in items]
        distinct = list(dict.fromkeys(pairs))
        rows = await self.infer(distinct, [False] * len(distinct))
        reward = {pair: float(row[0]) for pair, row in zip(distinct, rows, strict=True)}
        return [plain(item, reward[pair]) for item, pair in zip(items, pairs, strict=True)]

    def describe(self) -> dict[str, object]:
        return {"kind": "hf-reward-model", **self.model}


@dataclass
class Member:
    backend: RewardBackend
    weight: float
    standardize: str  # none | fixed | running
    mean: float = 0.0
    std: float = 1.0
    moments: RunningMoments | None = None

    def standardized(self, rewards: list[float]) -> list[float]:
        if self.standardize == "none":
            return rewards
        if self.moments is not None:  # running: this batch counts too, so a first batch is centred
            self.moments.update(rewards)
            self.mean, self.std = self.moments.mean, max(self.moments.std, 1e-6)
        return [(r - self.mean) / self.std for r in rewards]


class EnsembleBackend:
    def __init__(self, name: str, members: list[Member]) -> None:
        self.name = name
        self.members = members
        self.uses_relevance = any(m.backend.uses_relevance for m in members)
        self.uses_query_type = any(m.backend.uses_query_type for m in members)

    async def score(self, items: list[ResolvedItem]) -> list[Scored]:
        results = await asyncio.gather(*(m.backend.score(items) for m in self.members))
        parts = [m.standardized([r.reward for r in scored])
                 for m, scored in zip(self.members, results, strict=True)]
        scored: list[Scored] = []
        for index, item in enumerate(items):
            members = {m.backend.name: part[index] for m, part in zip(self.members, parts, strict=True)}
            reward = math.fsum(m.weight * part[index] for m, part in zip(self.members, parts, strict=True))
            # R3's own parts (relevance included) come from its member, when there is one.
            base = next((r[index] for m, r in zip(self.members, results, strict=True)
                         if m.backend.uses_relevance), None)
            scored.append(replace(base, reward=reward, members=members) if base is not None
                          else plain(item, reward, members))
        return scored

    def describe(self) -> dict[str, object]:
        return {"kind": "ensemble", "members": [
            {"backend": m.backend.name, "weight": m.weight, "standardize": m.standardize,
             "mean": m.mean, "std": m.std, **({"count": m.moments.count} if m.moments else {})}
            for m in self.members]}


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
            backends[name], queues[name] = RewardModelBackend(name, scheduler.run, {
                **describe_model(scheduler.model), "input_format": spec.input_format, "label": spec.label,
            }), (scheduler,)
        else:
            backends[name] = EnsembleBackend(name, [
                Member(backends[m.backend], m.weight, m.standardize, m.mean, m.std,
                       RunningMoments() if m.standardize == "running" else None)
                for m in spec.members])
            queues[name] = tuple(dict.fromkeys(q for m in spec.members for q in queues[m.backend]))
    return backends, queues


def default_relevance_range(model_name: str, normalized: bool) -> tuple[float, float]:
    """The packaged model's calibrated range; otherwise cosine's [0, 1] or the paper's [0, 3.5]."""
    if model_name == DEFAULT_MODEL and normalized:
        return PACKAGED_MODEL_RANGE
    return (0.0, 1.0) if normalized else (0.0, 3.5)


def rule_params(spec: R3BackendSpec, settings: Settings, normalized: bool) -> RuleParams:
    """The rule's parameters of an R3 backend: its spec, else the deployment's settings, else the
    model's default relevance range (also for tools that score without a service)."""
    in_range = spec.relevance_in_range or settings.relevance_in_range or default_relevance_range(
        spec.model or settings.model, normalized)
    branches = PRESETS[spec.preset].uses_query_type
    return RuleParams(
        relevance_in_range=in_range,
        relevance_out_range=(0.0, (spec.max_rollout_tokens or settings.max_rollout_tokens) / 100.0),
        lppo_target_length=spec.lppo_target_length or settings.lppo_target_length,
        # Only a preset that branches on the query type has branches to blend.
        soft_branch=(spec.soft_branch or settings.soft_branch) if branches else None,
    )


def r3_backend(name: str, spec: R3BackendSpec, settings: Settings,
               pool: ModelPool) -> tuple[R3Backend, Queues]:
    preset = PRESETS[spec.preset]
    normalize = spec.normalize if spec.normalize is not None else settings.normalize
    # A rule without relevance never loads a model.
    scheduler = pool.embedding(spec.model or settings.model, normalize) if preset.uses_relevance else None
    normalized = scheduler.model.info.normalize if scheduler else bool(normalize)
    params = rule_params(spec, settings, normalized)
    if scheduler is None:
        return R3Backend(name, preset, params, _no_embedding, {}), ()
    if not preset.guarded:
        return R3Backend(name, preset, params, scheduler.run, describe_model(scheduler.model)), (scheduler,)
    head = filler_head()
    filler = pool.embedding(head.model, None)  # the head's own model: the same queue when it is R3's
    return (R3Backend(name, preset, params, scheduler.run, describe_model(scheduler.model),
                      FillerDetector(head, filler.run, filler.model.word_vectors)),
            tuple(dict.fromkeys((scheduler, filler))))


@functools.cache
def filler_head() -> FillerHead:
    return FillerHead.load()


async def _no_embedding(texts: Sequence[str], cacheable: Sequence[bool]) -> torch.Tensor:
    raise AssertionError("a preset without relevance asked for embeddings")
