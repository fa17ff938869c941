"""The R3 rule and its ablation presets (spec, "The reward" and Table 4).

A preset says which relevance pair it needs embedded (if any) and how the parts combine; the
engine embeds the pairs of a whole batch at once and hands each item its dot product back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from r3_service.backends.text import (
    length_incentive,
    linear_map,
    lppo,
    repetition_penalty,
    word_tokens,
)
from r3_service.querytypes import QueryType

RelevanceTarget = Literal["query", "reference"]


@dataclass(frozen=True)
class ResolvedItem:
    """One item ready to score: clean texts and a known query type."""

    query: str
    response: str
    reference: str | None
    query_type: QueryType
    query_type_source: str
    reference_source: str | None


@dataclass(frozen=True)
class Scored:
    reward: float
    length_incentive: float
    repetition_penalty: float
    relevance: float | None
    relevance_target: RelevanceTarget | None
    query_type: QueryType
    query_type_source: str
    reference_source: str | None
    members: dict[str, float] | None = None  # an ensemble's parts, each after standardisation


@dataclass(frozen=True)
class RuleParams:
    relevance_in_range: tuple[float, float]
    relevance_out_range: tuple[float, float]
    lppo_target_length: int


@dataclass(frozen=True)
class Features:
    length_incentive: float
    repetition_penalty: float
    token_count: int


def _unchanged(item: ResolvedItem) -> ResolvedItem:
    return item


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    combine: Callable[[ResolvedItem, Features, float | None, RuleParams], float]
    # Which text the response's relevance is measured against; None for a rule without relevance.
    target: Callable[[ResolvedItem], RelevanceTarget] | None = None
    # Applied to each resolved item before anything else (r3-random-type re-draws the type).
    prepare: Callable[[ResolvedItem], ResolvedItem] = _unchanged

    @property
    def uses_relevance(self) -> bool:
        return self.target is not None

    @property
    def uses_query_type(self) -> bool:
        """Whether the item's query type can change the reward (only the branching rule)."""
        return self.target is _branch_target and self.prepare is _unchanged

    def relevance_pair(self, item: ResolvedItem) -> tuple[RelevanceTarget, str] | None:
        if self.target is None:
            return None
        target = self.target(item)
        return target, item.query if target == "query" else item.reference or ""


def features(response: str) -> Features:
    tokens = word_tokens(response)
    return Features(length_incentive(tokens), repetition_penalty(tokens), len(tokens))


def _closed_with_reference(item: ResolvedItem) -> bool:
    return item.query_type == "closed" and item.reference is not None


def _branch_target(item: ResolvedItem) -> RelevanceTarget:
    return "reference" if _closed_with_reference(item) else "query"


def _r3(item: ResolvedItem, f: Features, s: float | None, p: RuleParams) -> float:
    assert s is not None
    if _closed_with_reference(item):
        return linear_map(s, p.relevance_in_range, p.relevance_out_range) * f.repetition_penalty
    return f.length_incentive * s * f.repetition_penalty


def _open_rule(item: ResolvedItem, f: Features, s: float | None, p: RuleParams) -> float:
    assert s is not None
    return f.length_incentive * s * f.repetition_penalty


def random_query_type(query: str) -> QueryType:
    """A fixed coin flip per query (hash-seeded), so re-scoring an item gives the same reward."""
    return "closed" if hashlib.sha256(query.encode()).digest()[0] & 1 else "open"


def _with_random_type(item: ResolvedItem) -> ResolvedItem:
    return ResolvedItem(item.query, item.response, item.reference, random_query_type(item.query),
                        "random", item.reference_source)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("r3", "LI·S(x,y)·RP on open queries; f(S(ref,y))·RP on closed ones with a reference",
               _r3, _branch_target),
        Preset("r3-no-branch", "LI·S(x,y)·RP always (R3 without reference-answer relevance)",
               _open_rule, lambda item: "query"),
        Preset("li-rp", "LI·RP (no relevance)",
               lambda item, f, s, p: f.length_incentive * f.repetition_penalty),
        Preset("li", "LI only", lambda item, f, s, p: f.length_incentive),
        Preset("r3-random-type", "full R3 with a random (hash-seeded) query type per item",
               _r3, _branch_target, prepare=_with_random_type),
        Preset("relevance", "S(x,y) only (hacked by copying the question)",
               lambda item, f, s, p: float(s or 0.0), lambda item: "query"),
        Preset("lppo", "1 - |len/T - 1| (Singhal et al.)",
               lambda item, f, s, p: lppo(f.token_count, p.lppo_target_length)),
    )
}


def score(preset: Preset, item: ResolvedItem, relevance: float | None, params: RuleParams) -> Scored:
    """One item's reward and parts; `item` has been through `preset.prepare`."""
    f = features(item.response)
    pair = preset.relevance_pair(item)
    return Scored(
        reward=float(preset.combine(item, f, relevance, params)),
        length_incentive=f.length_incentive,
        repetition_penalty=f.repetition_penalty,
        relevance=relevance if pair is not None else None,
        relevance_target=pair[0] if pair is not None else None,
        query_type=item.query_type,
        query_type_source=item.query_type_source,
        reference_source=item.reference_source,
    )
