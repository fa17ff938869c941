"""How much of a response is copied from its query, in word n-grams (beyond the paper).

A relevance reward is gamed by echoing the question: S(x, x) is the largest relevance there is
for a cosine model. These functions find the response's words that sit inside an n-gram the query
also has (case-insensitive, R3's word tokens), so a reward can pay only for what the response
adds (`novel_text`) and a trainer can watch the share of copying (`copy_overlap`).

A query shorter than n words is matched with n = its own length: a two-word question echoed back
is still a copy.
"""

from __future__ import annotations

from r3_service.rule.features import WORDPUNCT, word_tokens

COPY_NGRAM = 4  # a restated phrase of the question ("the capital of France") is not a copy


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def copied_mask(query_tokens: list[str], response_tokens: list[str], n: int = COPY_NGRAM) -> list[bool]:
    """For each response token: does it lie inside an n-gram that the query also contains?"""
    size = min(n, len(query_tokens))
    if size == 0 or len(response_tokens) < size:
        return [False] * len(response_tokens)
    query = _ngrams([t.lower() for t in query_tokens], size)
    lowered = [t.lower() for t in response_tokens]
    mask = [False] * len(response_tokens)
    for start in range(len(lowered) - size + 1):
        if tuple(lowered[start:start + size]) in query:
            mask[start:start + size] = [True] * size
    return mask


def copy_overlap(query: str, response: str, n: int = COPY_NGRAM) -> float:
    """Share of the response's word tokens copied from the query in n-grams; 0.0 when empty."""
    mask = copied_mask(word_tokens(query), word_tokens(response), n)
    return sum(mask) / len(mask) if mask else 0.0


def novel_text(query: str, response: str, n: int = COPY_NGRAM) -> str:
    """The response with every run of copied words cut out; unchanged (the very same string) when
    nothing is copied, so an ordinary response embeds exactly as it did."""
    matches = list(WORDPUNCT.finditer(response))
    mask = copied_mask(word_tokens(query), [m.group() for m in matches], n)
    if not any(mask):
        return response
    kept: list[str] = []
    start = 0  # start of the text not yet cut
    for match, copied in zip(matches, mask, strict=True):
        if copied:
            kept.append(response[start:match.start()])
            start = match.end()
    kept.append(response[start:])
    return " ".join(" ".join(kept).split())
