"""What the engine reports of each scored request, for operators watching for reward hacking:
the reward's parts (in `Scored`), how much of each response is copied from its query, and how
many responses were empty. Read off the resolved items: clean query, cleaned response.

Copy overlap runs on every item, so the common case is made cheap: each distinct query's n-grams
are built once per request (a group's responses share it), and a response sharing no n-gram
with its query is 0.0 after one set test; only a response that does copy is measured exactly,
by the rule's own `copied_mask`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from r3_service.metrics import Metrics
from r3_service.rule.copying import COPY_NGRAM, copied_mask
from r3_service.rule.features import word_tokens
from r3_service.rule.reward import ResolvedItem, Scored

QueryGrams = tuple[list[str], int, frozenset[tuple[str, ...]]]


def _grams(tokens: list[str], size: int) -> Iterator[tuple[str, ...]]:
    """The lowercased n-grams of `tokens`, as the rule's `copied_mask` forms them."""
    lowered = list(map(str.lower, tokens))
    return zip(*(lowered[i:] for i in range(size)), strict=False)


def _query_grams(query: str) -> QueryGrams:
    tokens = word_tokens(query)
    size = min(COPY_NGRAM, len(tokens))
    return tokens, size, frozenset(_grams(tokens, size)) if size else frozenset()


def copy_overlaps(items: Sequence[ResolvedItem]) -> list[float]:
    """`copy_overlap(item.query, item.response)` of each item, in order."""
    queries: dict[str, QueryGrams] = {}
    overlaps: list[float] = []
    for item in items:
        grams = queries.get(item.query)
        if grams is None:
            grams = queries[item.query] = _query_grams(item.query)
        query_tokens, size, query_grams = grams
        tokens = word_tokens(item.response)
        if not size or len(tokens) < size or query_grams.isdisjoint(_grams(tokens, size)):
            overlaps.append(0.0)
            continue
        mask = copied_mask(query_tokens, tokens)
        overlaps.append(sum(mask) / len(mask))
    return overlaps


def observe(metrics: Metrics, backend: str, items: Sequence[ResolvedItem], results: Sequence[Scored]) -> None:
    """Record one scored request of `backend` (`items` as resolved, before a preset's `prepare`)."""
    metrics.observe_scores(backend, results, copy_overlaps(items), sum(not item.response for item in items))
