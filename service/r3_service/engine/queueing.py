"""The scheduler's queues: texts waiting for a batch, bucketed by length, and the share of a model
each tenant (a training job, known by its API key) gets when several have work queued.

Fairness has two halves. Admission (`Shares`): a tenant may fill the queue bound alone, but never
the part of it another active tenant is owed, so a steady job's next request is admitted while
another job's burst holds the rest. Batching (`FairQueue`): the next batch starts with the tenant
served least for its weight (tokens / weight, a virtual clock), so that request is computed next,
not after the burst's backlog."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Hashable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

import torch

# A text shorter than this fraction of its batch's longest waits for a batch of its own length.
MIN_FILL = 0.6

# The tenant of the request being scored (its API key's name; "" without keys), set by the engine
# for the request's task and read where its texts are queued.
TENANT: ContextVar[str] = ContextVar("r3_tenant", default="")

# A tenant with nothing held for this long is idle: it is owed no reserve.
IDLE_S = 10.0


@dataclass(frozen=True)
class BatchLimits:
    max_tokens: int  # padded tokens per forward
    max_size: int  # sequences per forward
    max_wait_s: float  # how long an idle model waits for a fuller batch
    max_queue_tokens: int  # tokens admitted requests may still embed
    shared_max_tokens: int | None = None  # padded tokens per forward while tenants share (None: max)


@dataclass(eq=False)
class Entry:
    """One distinct input in flight, shared by every request waiting for it."""

    input: Hashable
    future: asyncio.Future[torch.Tensor]
    cacheable: bool
    waiters: int = 1
    ids: list[int] = field(default_factory=list)
    ready_at: float = 0.0
    taken: bool = False  # left the ready queue (batched or dropped)
    tenant: str = ""  # whose request queued it first


class ReadyQueue:
    """Tokenised texts waiting for a batch, bucketed by length so a batch is formed in
    O(batch + distinct lengths), however deep the queue. Texts whose clients all left are
    dropped when met (lazily), not searched for."""

    def __init__(self, tenant: str = "") -> None:
        self.tenant = tenant
        self._buckets: dict[int, deque[Entry]] = {}  # length -> entries, oldest first
        self._arrivals: deque[Entry] = deque()  # every entry, oldest first (lazy deletion)
        self.count = 0
        self.tokens = 0

    def add(self, entries: list[Entry]) -> None:
        for entry in entries:
            self._buckets.setdefault(len(entry.ids), deque()).append(entry)
            self._arrivals.append(entry)
            self.count += 1
            self.tokens += len(entry.ids)

    def oldest(self) -> Entry | None:
        """The oldest text someone still waits for (and that has not moved to another tenant)."""
        while self._arrivals and (self._arrivals[0].taken or self._arrivals[0].waiters <= 0
                                  or self._arrivals[0].tenant != self.tenant):
            self._arrivals.popleft()
        return self._arrivals[0] if self._arrivals else None

    def remove(self, entry: Entry) -> None:
        """Take `entry` out (it moves to another tenant's queue)."""
        length = len(entry.ids)
        bucket = self._buckets[length]
        bucket.remove(entry)
        if not bucket:
            del self._buckets[length]
        self.count -= 1
        self.tokens -= length

    def drop_abandoned(self, abandoned: list[Entry]) -> None:
        """Move every text nobody waits for to `abandoned` (`oldest` found no live one). A text
        another request joined after `oldest` had passed it by is live: it goes back in line."""
        for length in list(self._buckets):
            bucket = self._buckets.pop(length)
            live = deque(entry for entry in bucket if entry.waiters > 0)
            for entry in bucket:
                if entry.waiters <= 0:
                    entry.taken = True
                    abandoned.append(entry)
                    self.count -= 1
                    self.tokens -= length
            if live:
                self._buckets[length] = live
                self._arrivals.extend(live)

    def fill(self, batch: list[Entry], anchor_length: int, limits: BatchLimits,
             abandoned: list[Entry]) -> bool:
        """Add to `batch` the texts closest in length to `anchor_length` that keep it within the
        padded-token budget and no shorter than MIN_FILL of the longest; True once it is full.
        Texts nobody waits for go to `abandoned`."""
        longest = max((len(e.ids) for e in batch), default=anchor_length)
        shortest = min((len(e.ids) for e in batch), default=anchor_length)
        for length in sorted(self._buckets, key=lambda n: abs(math.log(n / anchor_length))):
            wider_longest, wider_shortest = max(longest, length), min(shortest, length)
            if batch and wider_shortest < MIN_FILL * wider_longest:
                break
            while length in self._buckets:
                if self._buckets[length][0].waiters <= 0:
                    abandoned.append(self._pop(length))
                    continue
                if batch and (len(batch) >= limits.max_size
                              or (len(batch) + 1) * wider_longest > limits.max_tokens):
                    return True
                batch.append(self._pop(length))
                longest, shortest = wider_longest, wider_shortest
        return False

    def _pop(self, length: int) -> Entry:
        bucket = self._buckets[length]
        entry = bucket.popleft()
        if not bucket:
            del self._buckets[length]
        entry.taken = True
        self.count -= 1
        self.tokens -= length
        return entry


class FairQueue:
    """A ReadyQueue per tenant. A batch is anchored on the oldest text of the tenant with the
    least weighted service (tokens computed / weight) and filled from that tenant's queue first,
    then from the others' in the same order. With one tenant it is its ReadyQueue."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = weights
        self._queues: dict[str, ReadyQueue] = {}
        self._clock: dict[str, float] = {}  # tokens computed / weight, per tenant

    @property
    def count(self) -> int:
        return sum(q.count for q in self._queues.values())

    @property
    def tokens(self) -> int:
        return sum(q.tokens for q in self._queues.values())

    def depth(self, tenant: str) -> int:
        queue = self._queues.get(tenant)
        return queue.count if queue is not None else 0

    def add(self, entries: list[Entry]) -> None:
        for entry in entries:
            queue = self._queues.get(entry.tenant)
            if queue is None:
                queue = self._queues[entry.tenant] = ReadyQueue(entry.tenant)
            if not queue.count:  # back from idle: no credit saved up while away
                self._clock[entry.tenant] = max(self._clock.get(entry.tenant, 0.0), self._floor())
            queue.add([entry])

    def claim(self, entry: Entry, tenant: str) -> None:
        """Another tenant's request waits for `entry` too: if that tenant has been served less,
        the text moves to its place (a text two jobs share waits in the better of their queues)."""
        if tenant == entry.tenant or entry.taken:
            return
        if self._rank(tenant) >= self._rank(entry.tenant):
            return
        if entry.ready_at:  # in its tenant's queue: moved
            self._queues[entry.tenant].remove(entry)
            entry.tenant = tenant
            self.add([entry])
        else:  # still being tokenised: it joins this tenant's queue when ready
            entry.tenant = tenant

    def _floor(self) -> float:
        busy = [self._clock.get(t, 0.0) for t, q in self._queues.items() if q.count]
        return min(busy, default=0.0)

    def _rank(self, tenant: str) -> tuple[float, int]:
        """Served least first; between equals, the one with fewer texts waiting (a job back from
        idle starts level with the busiest, and goes first)."""
        return self._clock.get(tenant, self._floor()), self.depth(tenant)

    def _order(self) -> list[ReadyQueue]:
        """Tenants with live texts, in `_rank` order."""
        live = [(self._rank(t), t) for t, q in self._queues.items() if q.oldest() is not None]
        return [self._queues[t] for _, t in sorted(live)]

    def oldest(self) -> Entry | None:
        """The oldest text of the tenant served least (the next batch's anchor)."""
        order = self._order()
        return order[0].oldest() if order else None

    def take(self, limits: BatchLimits, abandoned: list[Entry]) -> list[Entry]:
        """The next batch (`FairQueue`); [] when only abandoned texts are left (then dropped)."""
        order = self._order()
        if not order:
            for queue in self._queues.values():
                queue.drop_abandoned(abandoned)
            return []
        anchor = order[0].oldest()
        assert anchor is not None
        if len(order) > 1 and limits.shared_max_tokens:  # shorter batches: shorter waits
            limits = replace(limits, max_tokens=limits.shared_max_tokens)
        batch: list[Entry] = []
        for queue in order:
            if queue.fill(batch, len(anchor.ids), limits, abandoned):
                break
        for entry in batch:
            served = len(entry.ids) / self.weights.get(entry.tenant, 1.0)
            self._clock[entry.tenant] = self._clock.get(entry.tenant, 0.0) + served
        return batch


class Shares:
    """Tokens held per tenant on one queue, and the admission rule: a request is admitted while
    its tenant stays within its weighted share of the bound among active tenants, or while the
    queue has room beyond what the other active tenants are still owed. A tenant holding nothing
    is admitted one request whatever its size (a request larger than the bound is slow, not
    refused). With a single tenant this is the plain bound."""

    def __init__(self, bound: int, weights: Mapping[str, float]) -> None:
        self.bound = bound
        self.weights = weights
        self.held: dict[str, int] = {}
        self.total = 0
        self._last_held: dict[str, float] = {}

    def admits(self, tenant: str, tokens: int) -> bool:
        mine = self.held.get(tenant, 0)
        if not mine:
            return True
        active = self._active(tenant)
        total_weight = sum(self.weights.get(t, 1.0) for t in active)
        owed = {t: self.bound * self.weights.get(t, 1.0) / total_weight for t in active}
        if mine + tokens <= owed[tenant]:
            return True
        reserved = sum(max(0.0, owed[t] - self.held.get(t, 0)) for t in active if t != tenant)
        return self.total + tokens <= self.bound - reserved

    def _active(self, tenant: str) -> set[str]:
        """`tenant` and those holding tokens now or in the last IDLE_S."""
        now = time.monotonic()
        return {tenant, *(t for t, at in self._last_held.items() if self.held.get(t) or now - at < IDLE_S)}

    def hold(self, tenant: str, tokens: int) -> None:
        self.held[tenant] = self.held.get(tenant, 0) + tokens
        self.total += tokens
        self._last_held[tenant] = time.monotonic()

    def release(self, tenant: str, tokens: int) -> None:
        self.held[tenant] -= tokens
        self.total -= tokens
        self._last_held[tenant] = time.monotonic()
