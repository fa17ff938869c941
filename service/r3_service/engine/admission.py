"""Admission: before any of its work, a request holds on every model queue it uses the tokens it
will embed there, and releases them once answered; a queue whose bound they would pass refuses it
(429) at once. The count depends on the request alone: its distinct texts, each charged a lower
bound of its tokens (its whitespace-separated words, the model's special tokens, the model's
length), so a refusal never rests on more work than the request brings."""

from __future__ import annotations

from collections.abc import Sequence

from r3_service.engine.resolve import RawItem
from r3_service.engine.scheduler import BatchScheduler, QueueFull


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


def demand(items: Sequence[RawItem]) -> set[str]:
    """The distinct texts a request may embed on each model it uses: every response, a closed
    query's reference, an open query's query, and both the query (to classify it) and any
    reference when the type is not given. A reward model reads each item's query and response
    as one input, no fewer tokens than these texts hold."""
    texts: set[str] = set()
    for item in items:
        texts.add(item.response)
        if item.reference and item.query_type != "open":
            texts.add(item.reference)
        if item.query_type != "closed" or not item.reference:
            texts.add(item.query)
    return texts


def admit(queues: Sequence[BatchScheduler], items: Sequence[RawItem]) -> Admission:
    """Hold the request's tokens on every queue, or raise QueueFull holding none."""
    words = [len(text.split()) for text in demand(items)]
    return Admission([(queue, queue.charge(words)) for queue in queues])
