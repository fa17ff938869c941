"""Admission: before any of its work, a request holds on every model queue it uses the tokens it
will embed there, and releases them once answered; a queue whose bound they would pass refuses it
(429) at once. The count depends on the request alone: its distinct texts, each charged a lower
bound of its tokens (its whitespace-separated words, the model's special tokens, the model's
length), so a refusal never rests on more work than the request brings."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from r3_service.engine.resolve import RawItem
from r3_service.engine.scheduler import BatchScheduler, QueueFull
from r3_service.models.base import ModelInfo


class Admission:
    """Tokens held on model queues for one request in flight; released once, however often asked."""

    def __init__(self, charges: Sequence[tuple[BatchScheduler, int]]) -> None:
        for index, (queue, tokens) in enumerate(charges):
            try:
                queue.hold(tokens)
            except QueueFull:
                for held, taken in charges[:index]:
                    held.release(taken)
                raise
        self._charges = tuple(charges)
        self.tokens = max((tokens for _, tokens in charges), default=0)

    def release(self) -> None:
        for queue, tokens in self._charges:
            queue.release(tokens)
        self._charges = ()


def item_texts(query: str, response: str, reference: str | None, query_type: str | None) -> tuple[str, ...]:
    """The texts one item may have embedded: its response, a closed query's reference, an open
    query's query, and both the query (to classify it) and any reference when the type is not
    given. A reward model reads the query and response as one input, no fewer tokens."""
    if not reference:
        return response, query
    if query_type == "open":
        return response, query
    if query_type == "closed":
        return response, reference
    return response, query, reference


def demand(items: Iterable[RawItem]) -> set[str]:
    """The distinct texts a request may embed on each model it uses (a GRPO group's query once)."""
    texts: set[str] = set()
    for item in items:
        texts.update(item_texts(item.query, item.response, item.reference, item.query_type))
    return texts


# The ASCII characters `str.split()` splits at, marked b" "; every other byte b"x".
_SPLITS_AT = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_WORD_MARKS = bytes(32 if byte in _SPLITS_AT else 120 for byte in range(256))


def words(text: str) -> int:
    """Whitespace-separated words of `text`, never more than `len(text.split())`: runs of its
    UTF-8 bytes between ASCII whitespace, counted without building them (a space outside ASCII,
    which is rare, joins two words into one and never splits one)."""
    marked = text.encode("utf-8", "surrogatepass").translate(_WORD_MARKS)
    return marked.count(b" x") + marked.startswith(b"x")


def charge(texts: Collection[str], model: ModelInfo) -> int:
    """Tokens `model` makes of `texts`, at least: each text's words (every word gives the
    tokenizer a token or more), plus the special tokens, truncated at the model's length. A text
    of fewer than 2·(length − special) characters holds too few words to be truncated (a word
    takes a character and a space), so those are counted in one pass over them joined."""
    special, most = model.special_tokens, model.max_length
    uncapped = 2 * (most - special)
    short = [text for text in texts if len(text) < uncapped]
    tokens = special * len(short) + words(" ".join(short))
    if len(short) < len(texts):
        tokens += sum(min(most, special + words(text)) for text in texts if len(text) >= uncapped)
    return tokens


def admit(queues: Sequence[BatchScheduler], texts: Collection[str]) -> Admission:
    """Hold the tokens of the distinct `texts` on every queue, or raise QueueFull holding none."""
    return Admission([(queue, charge(texts, queue.model.info)) for queue in queues])
