"""Admission: a request holds the texts it will embed on every model queue it uses before any of
its work starts, so the queue bound counts requests in flight and a refusal (429) costs nothing.
Before its body is read, a scoring request is admitted on an estimate from its size."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from r3_service.engine.resolve import RawItem
from r3_service.engine.scheduler import BatchScheduler, QueueFull

RECENT_REQUESTS = 64  # whose bytes per text estimate an unread body's texts
PRIOR_BYTES_PER_TEXT = 1000.0  # before any request: a text of ~200 tokens, in JSON


class Admission:
    """Texts held on model queues for one request in flight; released once, however often asked."""

    def __init__(self, queues: Sequence[BatchScheduler], texts: int) -> None:
        for index, queue in enumerate(queues):
            try:
                queue.hold(texts)
            except QueueFull:
                for held in queues[:index]:
                    held.release(texts)
                raise
        self._queues, self.texts = tuple(queues), texts

    def release(self) -> None:
        for queue in self._queues:
            queue.release(self.texts)
        self._queues = ()


@dataclass(frozen=True)
class BodySize:
    """A request body's size in bytes (Content-Length) and the endpoint it was sent to."""

    endpoint: str
    size: int


def demand(items: Sequence[RawItem]) -> int:
    """The distinct texts a request will embed on each model it uses, estimated before any work:
    every response, a closed query's reference, an open query's query, and both the query (to
    classify it) and any reference when the type is not given. A reward model runs one pair per
    item, no more than this."""
    texts: set[str] = set()
    for item in items:
        texts.add(item.response)
        if item.reference and item.query_type != "open":
            texts.add(item.reference)
        if item.query_type != "closed" or not item.reference:
            texts.add(item.query)
    return len(texts)


class BodySizes:
    """Bytes per text of each endpoint's recent requests, to estimate an unread body's texts.

    The estimate is low on purpose, at the most bytes per text seen: held capacity or a refusal
    never rests on a guess larger than the request (mixed traffic of short and long texts only
    makes the estimate less useful)."""

    def __init__(self) -> None:
        self._recent: dict[str, deque[float]] = {}

    def learn(self, body: BodySize, texts: int) -> None:
        if texts:
            self._recent.setdefault(body.endpoint, deque(maxlen=RECENT_REQUESTS)).append(body.size / texts)

    def texts(self, body: BodySize) -> int:
        recent = self._recent.get(body.endpoint)
        return max(1, int(body.size / (max(recent) if recent else PRIOR_BYTES_PER_TEXT)))
