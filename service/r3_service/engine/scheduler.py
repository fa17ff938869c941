"""Cross-request dynamic batching: one scheduler owns a model and turns a trickle of small
requests into full, length-sorted batches.

Every request's inputs (texts to embed, or (query, response) pairs to reward) go into one shared
queue. An input already queued or computing for another request is attached to that entry, and
the outputs of inputs that recur (queries and references) are kept in an LRU cache, so a GRPO
group's shared prompt or reference is embedded once. Tokenisation runs on a thread pool while
the model thread runs the previous batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress

import torch

from r3_service.caches import LruCache, text_bytes
from r3_service.engine.queueing import TENANT, BatchLimits, Entry, FairQueue, Shares
from r3_service.metrics import Metrics
from r3_service.models.base import BatchModel

log = logging.getLogger(__name__)


# Nice value of the model and tokenizer threads (and of the BLAS/OpenMP workers they start).
WORKER_NICE = 10


def yield_cpu() -> None:
    """Lower the calling thread's CPU priority (Linux: per thread), so the event loop runs the
    moment it has work: under a burst it answers 429s and reads bodies in milliseconds, while the
    model still takes every cycle the loop leaves idle. The model's threads inherit it."""
    if sys.platform == "linux":
        with suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)


class QueueFull(Exception):
    """The queue is at its bound; the caller should retry after `retry_after_s`."""

    def __init__(self, held: int, limit: int, retry_after_s: int) -> None:
        super().__init__(f"the scoring queue is full ({held} tokens admitted, limit {limit} "
                         f"(R3_MAX_QUEUE_TOKENS)); retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s


def output_cache(name: str, max_entries: int, max_bytes: int) -> LruCache[Hashable, torch.Tensor]:
    """LRU of input → output row, for inputs that recur (queries and references). A row is put
    as a copy of its own: a view would keep its whole batch's output alive."""
    return LruCache(name, max_entries=max_entries, max_bytes=max_bytes,
                    sizeof=lambda key, row: input_bytes(key) + row.nbytes + TENSOR_BYTES)


# A CPU tensor's Python object, TensorImpl and storage, beside its data.
TENSOR_BYTES = 400


def input_bytes(key: Hashable) -> int:
    """A text, or a (query, response) pair of texts."""
    return sum(map(text_bytes, key)) + 64 if isinstance(key, tuple) else text_bytes(key)  # type: ignore[arg-type]


class BatchScheduler:
    def __init__(self, model: BatchModel, limits: BatchLimits, metrics: Metrics, *, cache_size: int,
                 cache_bytes: int = 128 << 20, tokenizer_threads: int = 2, name: str = "model",
                 weights: Mapping[str, float] | None = None) -> None:
        self.model = model
        self.limits = limits
        self.metrics = metrics
        self.name = name
        self.cache = output_cache(name, cache_size, cache_bytes)
        self.shares = Shares(limits.max_queue_tokens, weights or {})
        self._pending: dict[Hashable, Entry] = {}  # queued, tokenising or computing
        self._ready = FairQueue(weights or {})  # tokenised, waiting for a batch
        self._wake = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="r3-model", initializer=yield_cpu)
        self._tokenizer_threads = tokenizer_threads
        self._tokenizers: dict[str, ThreadPoolExecutor] = {}  # per tenant: no job waits on another's
        self._admissions: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._tokens_per_s = 0.0  # moving average, for Retry-After

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="r3-scheduler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for entry in self._pending.values():
            entry.future.cancel()
        self._model_thread.shutdown(wait=True)
        for executor in self._tokenizers.values():
            executor.shutdown(wait=True)

    @property
    def held(self) -> int:
        """Tokens admitted requests may still embed (the queue bound's measure)."""
        return self.shares.total

    def hold(self, tokens: int, tenant: str = "") -> None:
        """Admit a request of `tenant` that will embed `tokens` tokens, or raise QueueFull at once.

        Callers hold before any of a request's work and `release` when it is answered, so the
        bound counts the work of requests in flight and a refusal costs next to nothing. The
        bound is shared between tenants by weight (`Shares`); a tenant holding nothing is
        admitted, so one request larger than the bound is slow, not refused."""
        if not self.shares.admits(tenant, tokens):
            self.metrics.rejected.inc()
            self.metrics.tenant_rejected.labels(tenant).inc()
            raise QueueFull(self.shares.total, self.limits.max_queue_tokens, self._retry_after(tokens))
        self.shares.hold(tenant, tokens)
        self.metrics.tenant_admitted_tokens.labels(tenant).inc(tokens)

    def release(self, tokens: int, tenant: str = "") -> None:
        self.shares.release(tenant, tokens)

    def queued_by(self, tenant: str) -> int:
        """Texts of `tenant` waiting for a batch."""
        return self._ready.depth(tenant)

    async def run(self, inputs: Sequence[Hashable], cacheable: Sequence[bool]) -> torch.Tensor:
        """Output rows of distinct `inputs`, in order (the caller holds them with `hold`)."""
        out = torch.empty(len(inputs), self.model.info.dim)
        waiting: list[tuple[int, Entry]] = []
        new: list[Entry] = []
        tenant = TENANT.get()
        loop = asyncio.get_running_loop()
        hits = misses = 0
        for index, (key, keep) in enumerate(zip(inputs, cacheable, strict=True)):
            row = self.cache.get(key) if keep else None
            if row is not None:
                hits += 1
                out[index] = row
                continue
            misses += keep
            entry = self._pending.get(key)
            if entry is None:
                entry = self._pending[key] = Entry(key, loop.create_future(), keep, tenant=tenant)
                new.append(entry)
            else:
                self.metrics.dedup.inc()
                self._ready.claim(entry, tenant)
                entry.waiters += 1
                entry.cacheable |= keep
            waiting.append((index, entry))
        self._count_lookups(hits, misses)
        if new:
            self._admit(new)
        try:
            for index, entry in waiting:
                out[index] = await asyncio.shield(entry.future)
        except asyncio.CancelledError:  # the client went away: its queued work is dropped
            for _, entry in waiting:
                entry.waiters -= 1
            self._wake.set()
            raise
        return out

    def _count_lookups(self, hits: int, misses: int) -> None:
        for outcome, count in (("hit", hits), ("miss", misses)):
            if count:
                self.metrics.cache.labels(outcome).inc(count)

    def _admit(self, entries: list[Entry]) -> None:
        """Tokenise off the event loop in a task of its own, so a cancelled request cannot
        strand entries other requests share."""
        task = asyncio.get_running_loop().create_task(self._tokenize(entries))
        self._admissions.add(task)
        task.add_done_callback(self._admissions.discard)

    def _tokenizer(self, tenant: str) -> ThreadPoolExecutor:
        """The tenant's own tokenizer threads: a burst's tokenisation queues behind itself only."""
        executor = self._tokenizers.get(tenant)
        if executor is None:
            executor = self._tokenizers[tenant] = ThreadPoolExecutor(
                self._tokenizer_threads, thread_name_prefix=f"r3-tokenize-{tenant}", initializer=yield_cpu)
        return executor

    async def _tokenize(self, entries: list[Entry]) -> None:
        loop = asyncio.get_running_loop()
        try:
            sequences = await loop.run_in_executor(self._tokenizer(entries[0].tenant), self.model.tokenize,
                                                   [e.input for e in entries])
        except Exception as error:  # handed to every waiter instead
            self._fail(entries, error)
            return
        now = time.monotonic()
        for entry, ids in zip(entries, sequences, strict=True):
            entry.ids, entry.ready_at = ids, now
        self._ready.add(entries)
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_work()
            batch = self._take_batch()
            if not batch:
                continue
            self._observe_batch(batch)
            started = time.perf_counter()
            try:
                rows = await loop.run_in_executor(self._model_thread, self._forward, [e.ids for e in batch])
            except Exception as error:  # handed to the waiters; the loop goes on
                log.exception("batch of %d failed", len(batch))
                self._fail(batch, error)
                continue
            elapsed = time.perf_counter() - started
            self.metrics.compute_seconds.observe(elapsed)
            tokens = sum(len(e.ids) for e in batch)
            self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * tokens / max(elapsed, 1e-6)
            for entry, row in zip(batch, rows, strict=True):
                self._pending.pop(entry.input, None)
                if entry.cacheable:
                    self.cache.put(entry.input, row.clone())
                if not entry.future.done():
                    entry.future.set_result(row)

    async def _wait_for_work(self) -> None:
        """Return when a full batch is ready, or the oldest ready text has waited max_wait."""
        while True:
            oldest = self._ready.oldest()
            if oldest is None:
                if self._ready.count:  # only abandoned texts: the next take drops them
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._ready.count >= self.limits.max_size or self._ready.tokens >= self.limits.max_tokens:
                return
            remaining = oldest.ready_at + self.limits.max_wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[Entry]:
        """First come, first served, while padding stays small (on the CPU padding is the main
        waste; on a GPU a launch is cheap). Sorted longest first: padded to the first."""
        abandoned: list[Entry] = []
        batch = self._ready.take(self.limits, abandoned)
        if abandoned:
            for entry in abandoned:
                self._pending.pop(entry.input, None)
                entry.future.cancel()
            self.metrics.dropped.inc(len(abandoned))
        batch.sort(key=lambda e: len(e.ids), reverse=True)
        return batch

    def _forward(self, sequences: list[list[int]]) -> torch.Tensor:
        """Runs on the model thread. A CUDA out-of-memory error halves the batch and retries."""
        try:
            return self.model.forward(sequences)
        except torch.cuda.OutOfMemoryError:
            if len(sequences) == 1:
                raise
            self.metrics.oom_splits.inc()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(sequences) // 2
            return torch.cat([self._forward(sequences[:half]), self._forward(sequences[half:])])

    def _observe_batch(self, batch: list[Entry]) -> None:
        now = time.monotonic()
        real = sum(len(e.ids) for e in batch)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.real_tokens.observe(real)
        self.metrics.padded_tokens.observe(len(batch[0].ids) * len(batch))
        for entry in batch:
            self.metrics.queue_wait_seconds.observe(now - entry.ready_at)

    def _fail(self, entries: list[Entry], error: BaseException) -> None:
        for entry in entries:
            self._pending.pop(entry.input, None)
            if not entry.future.done():
                entry.future.set_exception(error)
                entry.future.exception()  # mark retrieved: waiters may all be gone

    def _retry_after(self, extra: int) -> int:
        """Seconds until the held tokens and `extra` are cleared at the measured rate."""
        rate = self._tokens_per_s or 5000.0
        return max(1, math.ceil((self.shares.total + extra) / rate))
