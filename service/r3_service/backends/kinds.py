"""The reward backends a deployment configures: an R3 preset over an embedding model, a
sequence-classification reward model, and a weighted ensemble of the two.

Backends never touch a model directly: they are handed an `Infer` function (the engine's batching
scheduler for their model), so concurrent requests share batches whichever backend they use.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from r3_service.backends.r3 import Preset, ResolvedItem, RuleParams, Scored, features, score
from r3_service.backends.reward_model import exchange_key

# Rows for distinct inputs, in order; the flags say which inputs are worth caching.
Infer = Callable[[Sequence[str], Sequence[bool]], Awaitable[torch.Tensor]]


class RewardBackend(Protocol):
    name: str
    uses_relevance: bool
    uses_query_type: bool  # False: an unknown query type need not be classified

    async def score(self, items: list[ResolvedItem]) -> list[Scored]: ...

    def describe(self) -> dict[str, object]: ...


class R3Backend:
    def __init__(self, name: str, preset: Preset, params: RuleParams, embed: Infer,
                 model: dict[str, object]) -> None:
        self.name = name
        self.preset = preset
        self.params = params
        self.embed = embed
        self.model = model
        self.uses_relevance = preset.uses_relevance
        self.uses_query_type = preset.uses_query_type

    async def score(self, items: list[ResolvedItem]) -> list[Scored]:
        prepared = [self.preset.prepare(item) for item in items]
        relevance = await self._relevance(prepared)
        return [score(self.preset, item, s, self.params) for item, s in zip(prepared, relevance, strict=True)]

    async def _relevance(self, items: list[ResolvedItem]) -> list[float | None]:
        """S for every item that needs one; each distinct text is embedded once, and queries and
        references (which recur across a group and across steps) may come from the cache."""
        pairs = [self.preset.relevance_pair(item) for item in items]
        cacheable: dict[str, bool] = {}  # each distinct text, in first-seen order
        for pair, item in zip(pairs, items, strict=True):
            if pair is not None:
                cacheable[pair[1]] = True
                cacheable.setdefault(item.response, False)
        if not cacheable:
            return [None] * len(items)
        embeddings = await self.embed(list(cacheable), list(cacheable.values()))
        texts = {text: index for index, text in enumerate(cacheable)}
        wanted = [(texts[p[1]], texts[item.response]) for p, item in zip(pairs, items, strict=True)
                  if p is not None]
        left, right = (torch.tensor(side) for side in zip(*wanted, strict=True))
        dots = iter((embeddings[left] * embeddings[right]).sum(dim=-1).tolist())
        return [next(dots) if pair is not None else None for pair in pairs]

    def describe(self) -> dict[str, object]:
        return {
            "kind": "r3", "preset": self.preset.name, "description": self.preset.description,
            **self.model,
            "relevance_in_range": list(self.params.relevance_in_range),
            "relevance_out_range": list(self.params.relevance_out_range),
            "lppo_target_length": self.params.lppo_target_length,
        }


def plain(item: ResolvedItem, reward: float, members: dict[str, float] | None = None) -> Scored:
    """A reward that is not R3's, with R3's cheap parts alongside for logging."""
    f = features(item.response)
    return Scored(reward=reward, length_incentive=f.length_incentive, repetition_penalty=f.repetition_penalty,
                  relevance=None, relevance_target=None, query_type=item.query_type,
                  query_type_source=item.query_type_source, reference_source=item.reference_source,
                  members=members)


class RewardModelBackend:
    uses_relevance = False
    uses_query_type = False

    def __init__(self, name: str, infer: Infer, model: dict[str, object]) -> None:
        self.name = name
        self.infer = infer
        self.model = model

    async def score(self, items: list[ResolvedItem]) -> list[Scored]:
        keys = [exchange_key(item.query, item.response) for item in items]
        distinct = list(dict.fromkeys(keys))
        rows = await self.infer(distinct, [False] * len(distinct))
        reward = {key: float(row[0]) for key, row in zip(distinct, rows, strict=True)}
        return [plain(item, reward[key]) for item, key in zip(items, keys, strict=True)]

    def describe(self) -> dict[str, object]:
        return {"kind": "hf-reward-model", **self.model}


class RunningMoments:
    """Mean and standard deviation of every value seen (Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0

    def update(self, values: Sequence[float]) -> None:
        if not values:
            return
        count = len(values)
        mean = math.fsum(values) / count
        m2 = math.fsum((v - mean) ** 2 for v in values)
        total = self.count + count
        delta = mean - self.mean
        self._m2 += m2 + delta * delta * self.count * count / total
        self.mean += delta * count / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / self.count) if self.count > 1 else 1.0


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
