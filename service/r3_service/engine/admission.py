"""Admission: before any of its work, a request holds on every model queue it uses the tokens it
will embed there, and releases them once answered; a queue whose bound they would pass refuses it
(429) at once. The count depends on the request alone: what it asks each model to read, charged a
lower bound of its tokens (whitespace-separated words, the model's special tokens, the model's
length): its distinct texts on an embedding model, its distinct (query, response) pairs on a reward
model, which reads each pair as one input. So a refusal never rests on more work than the request
brings."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import replace

from r3_service.engine.resolve import RawItem
from r3_service.engine.scheduler import BatchScheduler, QueueFull
from r3_service.models.base import ModelInfo
from r3_service.models.reward_model import RewardModel


class Admission:
    """Tokens held on model queues for one request in flight; released once, however often asked."""

    def __init__(self, charges: Sequence[tuple[BatchScheduler, int]], tenant: str = "") -> None:
        for index, (queue, tokens) in enumerate(charges):
            try:
                queue.hold(tokens, tenant)
            except QueueFull:
                for held, taken in charges[:index]:
                    held.release(taken, tenant)
                raise
        self._charges = tuple(charges)
        self.tenant = tenant
        self.tokens = max((tokens for _, tokens in charges), default=0)

    def release(self) -> None:
        for queue, tokens in self._charges:
            queue.release(tokens, self.tenant)
        self._charges = ()


def item_texts(query: str, response: str, reference: str | None, query_type: str | None) -> tuple[str, ...]:
    """The texts one item may have embedded: its response, a closed query's reference, an open
    query's query, and both the query (to classify it) and any reference when the type is not
    given."""
    if not reference:
        return response, query
    if query_type == "open":
        return response, query
    if query_type == "closed":
        return response, reference
    return response, query, reference


class Demand(set[str]):
    """The distinct texts a request may embed (a GRPO group's query once), and in `pairs` its
    distinct (query, response) pairs, what a reward model reads."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: set[tuple[str, str]] = set()


def demand(items: Iterable[RawItem]) -> Demand:
    """What a request may ask of each model it uses."""
    found = Demand()
    for item in items:
        found.update(item_texts(item.query, item.response, item.reference, item.query_type))
        found.pairs.add((item.query, item.response))
    return found


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


def charge_pairs(pairs: Collection[tuple[str, str]], model: ModelInfo) -> int:
    """Tokens a reward model makes of (query, response) `pairs`, at least: one input each, with the
    special tokens of a pair, truncated once at the model's length. A pair is counted as its two
    texts joined by a space, whose words are theirs added up; one with a blank response (read as
    the query alone, with fewer special tokens) as its query's words only."""
    joined = [f"{query} {response}" for query, response in pairs if response.strip()]
    blank = [query for query, response in pairs if not response.strip()]
    return charge(joined, model) + charge(blank, replace(model, special_tokens=0))


def charge_on(queue: BatchScheduler, texts: Collection[str]) -> int:
    """The charge of `texts` (a `Demand`, or bare texts) on `queue`: its pairs on a reward model,
    its texts on an embedding model."""
    if isinstance(queue.model, RewardModel) and isinstance(texts, Demand):
        return charge_pairs(texts.pairs, queue.model.info)
    return charge(texts, queue.model.info)


def admit(queues: Sequence[BatchScheduler], texts: Collection[str], tenant: str = "") -> Admission:
    """Hold the tokens of the distinct `texts` on every queue for `tenant`, or raise QueueFull
    holding none."""
    return Admission([(queue, charge_on(queue, texts)) for queue in queues], tenant)
