"""The R3 rule and its ablation presets (spec, "The reward" and Table 4), in one page.

    S(a, b) = E(a)·E(b)                          relevance: a dot product of embeddings
    open, or closed without a reference:   R = LI(y) · S(x, y) · RP(y)
    closed with a reference:               R = f(S(ref, y)) · RP(y)     f linear, not clipped

A preset says which relevance pair it needs (if any) and how the parts combine. The engine embeds
the pairs of a whole batch at once and computes S with `relevance` below; LI, RP and f are in
`features`. Pure Python: no torch, no web framework.

Soft branch (opt-in, beyond the paper): when the classifier typed a query with p(open) inside a
configured band, a preset that branches on the type pays p · R_open + (1 − p) · R_closed, so a
coin-flip classification moves the reward a little instead of switching rules outright.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, TypeVar

from r3_service.rule.copying import copy_overlap
from r3_service.rule.features import Features, features_of, length_incentive, linear_map, lppo
from r3_service.rule.guards import Detection, GuardParams, guarded_reward, tokenise
from r3_service.rule.querytypes import QueryType

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
    # The classifier's p(open) when the type came from it (fresh or stored with its id), else None.
    open_probability: float | None = None


@dataclass(frozen=True)
class Scored:
    """One item's reward and the parts it was made of (the API's `components`)."""

    reward: float
    length_incentive: float
    repetition_penalty: float
    relevance: float | None
    relevance_target: RelevanceTarget | None
    query_type: QueryType
    query_type_source: str
    reference_source: str | None
    members: dict[str, float] | None = None  # an ensemble's parts, each after standardisation
    # Probability of the type used; None unless a classifier with probabilities gave the type.
    query_type_confidence: float | None = None
    open_branch_weight: float | None = None  # p(open) when the reward blends both branches
    unpaid: dict[str, float] | None = None  # a guarded preset's unpaid shares by reason


@dataclass(frozen=True)
class RuleParams:
    relevance_in_range: tuple[float, float]
    relevance_out_range: tuple[float, float]
    lppo_target_length: int
    # [lo, hi] on p(open), inclusive: the band of classifier answers whose reward blends both
    # branches; None: always the hard branch.
    soft_branch: tuple[float, float] | None = None
    guards: GuardParams = field(default_factory=GuardParams)  # r3-guarded's detectors and penalty
    # r3-bounded: LI counts at most this many (paid) tokens, so LI <= length_cap / 100. 80% of the
    # shipped data's reference answers to open queries are shorter than 100 tokens.
    length_cap: int = 100
    # r3-bounded, closed queries with a reference: tokens past factor x the reference's + slack
    # are excess, and the reward loses the excess's share of it.
    reference_budget: tuple[float, int] = (2.0, 10)


class Rows(Protocol):
    """(n, d) rows of numbers: a torch tensor or a numpy array."""

    def __mul__(self, other: Rows, /) -> Rows: ...

    def sum(self, axis: int, /) -> Rows: ...


R = TypeVar("R", bound=Rows)


def relevance(left: R, right: R) -> R:
    """S row by row: the dot product of each left embedding with its right one, (n, d) -> (n,).
    Normalised embeddings make it a cosine in [-1, 1]; raw ones (Contriever) are unbounded."""
    return (left * right).sum(-1)  # type: ignore[return-value]


def _closed_with_reference(item: ResolvedItem) -> bool:
    return item.query_type == "closed" and item.reference is not None


def _branch_target(item: ResolvedItem) -> RelevanceTarget:
    return "reference" if _closed_with_reference(item) else "query"


def _always_query(item: ResolvedItem) -> RelevanceTarget:
    return "query"


def _r3(item: ResolvedItem, f: Features, s: float | None, p: RuleParams) -> float:
    assert s is not None
    if _closed_with_reference(item):
        return linear_map(s, p.relevance_in_range, p.relevance_out_range) * f.repetition_penalty
    return f.length_incentive * s * f.repetition_penalty


def _r3_novel(item: ResolvedItem, f: Features, s: float | None, p: RuleParams) -> float:
    """R3 less the share of it the response copied from the query (its words inside a 4-gram of
    the query that the reference answer, when there is one, does not also copy): an echo of the
    question earns nothing, and copying never raises a reward (a negative one grows by it)."""
    reward = _r3(item, f, s, p)
    return reward - abs(reward) * copy_overlap(item.query, item.response, exempt=item.reference)


def _r3_bounded(item: ResolvedItem, f: Features, s: float | None, p: RuleParams) -> float:
    """R3 (LI already capped by `score`), less the share of a closed answer past its budget: an
    answer buried in text the reference does not need earns less, never more."""
    reward = _r3(item, f, s, p)
    if not _closed_with_reference(item):
        return reward
    factor, slack = p.reference_budget
    budget = factor * len(tokenise(item.reference or "").tokens) + slack
    excess = max(0.0, f.token_count - budget) / f.token_count if f.token_count else 0.0
    return reward - abs(reward) * excess


def _open_rule(item: ResolvedItem, f: Features, s: float | None, p: RuleParams) -> float:
    assert s is not None
    return f.length_incentive * s * f.repetition_penalty


def random_query_type(query: str) -> QueryType:
    """A fixed coin flip per query (hash-seeded), so re-scoring an item gives the same reward."""
    return "closed" if hashlib.sha256(query.encode()).digest()[0] & 1 else "open"


def _unchanged(item: ResolvedItem) -> ResolvedItem:
    return item


def _with_random_type(item: ResolvedItem) -> ResolvedItem:
    return ResolvedItem(item.query, item.response, item.reference, random_query_type(item.query),
                        "random", item.reference_source)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    combine: Callable[[ResolvedItem, Features, float | None, RuleParams], float]
    # Which text the response's relevance is measured against; None for a rule without relevance.
    target: Callable[[ResolvedItem], RelevanceTarget] | None = None
    # Whether the item's query type (from the request, store or classifier) can change the reward.
    uses_query_type: bool = False
    # Applied to each resolved item before anything else (r3-random-type re-draws the type).
    prepare: Callable[[ResolvedItem], ResolvedItem] = _unchanged
    # Whether it pays only for the response's content (`rule.guards`): relevance and length of the
    # paid text, less a share for the rest.
    guarded: bool = False
    # Whether LI stops growing at `RuleParams.length_cap` tokens (r3-bounded).
    capped_length: bool = False

    @property
    def uses_relevance(self) -> bool:
        return self.target is not None

    def relevance_pair(self, item: ResolvedItem) -> tuple[RelevanceTarget, str] | None:
        if self.target is None:
            return None
        target = self.target(item)
        return target, item.query if target == "query" else item.reference or ""

    def open_weight(self, item: ResolvedItem, params: RuleParams) -> float | None:
        """p(open) when `item`'s reward blends both branches: the type can change the reward
        (a branching preset, a reference) and the classifier was unsure (p inside the band)."""
        band, p = params.soft_branch, item.open_probability
        if band is None or p is None or not self.uses_query_type or item.reference is None:
            return None
        return p if band[0] <= p <= band[1] else None

    def other_pair(self, item: ResolvedItem, params: RuleParams) -> tuple[RelevanceTarget, str] | None:
        """The relevance pair of the branch of the other type, for a blended item; else None."""
        if self.open_weight(item, params) is None:
            return None
        other: QueryType = "closed" if item.query_type == "open" else "open"
        return self.relevance_pair(replace(item, query_type=other))


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("r3", "LI·S(x,y)·RP on open queries; f(S(ref,y))·RP on closed ones with a reference",
               _r3, _branch_target, uses_query_type=True),
        Preset("r3-novel", "R3 x (1 - share of the response's words copied from the query in 4-grams "
               "the reference does not share): closes the copy-the-question hole (beyond the paper)",
               _r3_novel, _branch_target, uses_query_type=True),
        Preset("r3-guarded", "R3 of the response's content only: an echo or rewording of the question, "
               "repeated text and generic filler earn no length and no relevance, and cost a share of the "
               "reward (rule.guards; beyond the paper)", _r3, _branch_target, uses_query_type=True,
               guarded=True),
        Preset("r3-bounded", "r3-guarded that pays for length only up to a point: LI counts at most "
               "100 paid tokens, and a closed answer longer than 2x its reference + 10 tokens loses the "
               "excess's share of its reward (beyond the paper)", _r3_bounded, _branch_target,
               uses_query_type=True, guarded=True, capped_length=True),
        Preset("r3-no-branch", "LI·S(x,y)·RP always (R3 without reference-answer relevance)",
               _open_rule, _always_query),
        Preset("li-rp", "LI·RP (no relevance)",
               lambda item, f, s, p: f.length_incentive * f.repetition_penalty),
        Preset("li", "LI only", lambda item, f, s, p: f.length_incentive),
        Preset("r3-random-type", "full R3 with a random (hash-seeded) query type per item",
               _r3, _branch_target, prepare=_with_random_type),
        Preset("relevance", "S(x,y) only (hacked by copying the question)",
               lambda item, f, s, p: float(s or 0.0), _always_query),
        Preset("lppo", "1 - |len/T - 1| (Singhal et al.)",
               lambda item, f, s, p: lppo(f.token_count, p.lppo_target_length)),
    )
}


def score(preset: Preset, item: ResolvedItem, s: float | None, params: RuleParams,
          s_other: float | None = None, detection: Detection | None = None) -> Scored:
    """One item's reward and parts; `item` has been through `preset.prepare`, `s` is its S and
    `s_other` the S of the other branch (`preset.other_pair`), needed only when it blends. A
    guarded preset passes the response's `detection`, and S of its paid text where the cut moves S
    (`Detection.moves_relevance`), else of the whole response."""
    tokens = tokenise(item.response).tokens
    paid = tokens if detection is None else detection.paid_tokens
    cap = params.length_cap if preset.capped_length else None
    f = replace(features_of(tokens), length_incentive=length_incentive(paid, cap), token_count=len(paid))
    pair = preset.relevance_pair(item)
    weight = preset.open_weight(item, params)
    if detection is not None and not detection.paid_tokens:
        reward = 0.0  # nothing but echo, repetition and filler
    else:
        reward = (preset.combine(item, f, s, params) if weight is None
                  else blend(preset, item, f, s, s_other, params, weight))
    if detection is not None:
        reward = guarded_reward(reward, detection, params.guards)
    return Scored(
        reward=float(reward),
        length_incentive=f.length_incentive,
        repetition_penalty=f.repetition_penalty,
        relevance=s if pair is not None else None,
        relevance_target=pair[0] if pair is not None else None,
        query_type=item.query_type,
        query_type_source=item.query_type_source,
        reference_source=item.reference_source,
        query_type_confidence=query_type_confidence(item),
        open_branch_weight=weight,
        unpaid=dict(detection.shares) if detection is not None else None,
    )


def blend(preset: Preset, item: ResolvedItem, f: Features, s: float | None, s_other: float | None,
          params: RuleParams, p: float) -> float:
    """p · R_open + (1 − p) · R_closed, each the preset's reward as if the type were that one."""
    s_open, s_closed = (s, s_other) if item.query_type == "open" else (s_other, s)
    r_open = preset.combine(replace(item, query_type="open"), f, s_open, params)
    r_closed = preset.combine(replace(item, query_type="closed"), f, s_closed, params)
    return p * r_open + (1.0 - p) * r_closed


def query_type_confidence(item: ResolvedItem) -> float | None:
    """The classifier's probability of the type the item was scored with."""
    p = item.open_probability
    if p is None:
        return None
    return p if item.query_type == "open" else 1.0 - p


def plain(item: ResolvedItem, reward: float, members: dict[str, float] | None = None) -> Scored:
    """A reward that is not R3's (a reward model's, an ensemble's), with R3's cheap parts
    alongside for logging."""
    f = features_of(tokenise(item.response).tokens)
    return Scored(reward=reward, length_incentive=f.length_incentive, repetition_penalty=f.repetition_penalty,
                  relevance=None, relevance_target=None, query_type=item.query_type,
                  query_type_source=item.query_type_source, reference_source=item.reference_source,
                  members=members, query_type_confidence=query_type_confidence(item))
