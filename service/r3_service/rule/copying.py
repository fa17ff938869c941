"""How much of a response is copied from its query, in word n-grams (beyond the paper).

A relevance reward is gamed by echoing the question: S(x, x) is the largest relevance there is
for a cosine model. These functions find the response's words that sit inside an n-gram the query
also has (case-insensitive, R3's word tokens), so a reward can take the copied share away (the
`r3-novel` preset) and a trainer or an operator can watch the share of copying (`copy_overlap`).

A query shorter than n words is matched with n = its own length: a two-word question echoed back
is still a copy. An n-gram that the reference answer also takes from the query (an edited
sentence, an extracted name) is what a good answer does, so it can be exempted (`exempt`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from r3_service.rule.features import word_tokens

COPY_NGRAM = 4  # a restated phrase of the question ("the capital of France") is not a copy


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def _lower(tokens: Sequence[str]) -> list[str]:
    return [t.lower() for t in tokens]


def _query_ngrams(query_tokens: list[str], n: int,
                  exempt_tokens: Sequence[str] = ()) -> tuple[int, set[tuple[str, ...]]]:
    """(the n used, the query's lowercased n-grams of that size less those of `exempt_tokens`)."""
    size = min(n, len(query_tokens))
    if not size:
        return 0, set()
    return size, _ngrams(_lower(query_tokens), size) - _ngrams(_lower(exempt_tokens), size)


def _mask(query: tuple[int, set[tuple[str, ...]]], response_tokens: list[str]) -> list[bool]:
    size, grams = query
    mask = [False] * len(response_tokens)
    if size == 0 or len(response_tokens) < size:
        return mask
    lowered = _lower(response_tokens)
    for start in range(len(lowered) - size + 1):
        if tuple(lowered[start:start + size]) in grams:
            mask[start:start + size] = [True] * size
    return mask


def _share(mask: list[bool]) -> float:
    return sum(mask) / len(mask) if mask else 0.0


def copied_mask(query_tokens: list[str], response_tokens: list[str], n: int = COPY_NGRAM) -> list[bool]:
    """For each response token: does it lie inside an n-gram that the query also contains?"""
    return _mask(_query_ngrams(query_tokens, n), response_tokens)


def copy_overlaps(pairs: Iterable[tuple[str, str]], n: int = COPY_NGRAM) -> list[float]:
    """`copy_overlap` of each (query, response)."""
    return copy_shares(((query, word_tokens(response)) for query, response in pairs), n)


def copy_shares(pairs: Iterable[tuple[str, list[str]]], n: int = COPY_NGRAM) -> list[float]:
    """`copy_overlaps` of responses already split into word tokens; each distinct query's n-grams
    are built once (a group of responses shares its query), so it is cheap enough to run on every
    request."""
    queries: dict[str, tuple[int, set[tuple[str, ...]]]] = {}
    overlaps = []
    for query, tokens in pairs:
        if query not in queries:
            queries[query] = _query_ngrams(word_tokens(query), n)
        overlaps.append(_share(_mask(queries[query], tokens)))
    return overlaps


def copy_overlap(query: str, response: str, n: int = COPY_NGRAM, exempt: str | None = None) -> float:
    """Share of the response's word tokens copied from the query in n-grams (those `exempt` also
    has do not count); 0.0 when empty."""
    exempt_tokens = word_tokens(exempt) if exempt else []
    return _share(_mask(_query_ngrams(word_tokens(query), n, exempt_tokens), word_tokens(response)))
