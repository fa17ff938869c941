"""Query-type/reference stores: in-process, Redis, and the fault-tolerant pair the service uses.

A reward call must never fail because Redis is down or slow: lookups are bounded by a timeout,
a failure switches the service to its in-process copy for `retry_s`, and Redis is tried again
after that (redis-py reconnects by itself).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from r3_service.caches import LruCache, text_bytes
from r3_service.rule.datasets import QueryRecord
from r3_service.store.records import READ_FIELDS, fields_to_record, record_to_fields, stale_fields

log = logging.getLogger(__name__)


# A record object with its four slots and the float, beside its reference text.
RECORD_BYTES = 120


class MemoryStore:
    """A bounded LRU map of key → record, living in the service process (bounded in records
    and in bytes: a record holds its reference answer, which may be long)."""

    def __init__(self, capacity: int, max_bytes: int = 64 << 20) -> None:
        self.capacity = capacity
        self.cache: LruCache[str, QueryRecord] = LruCache(
            "store", max_entries=capacity, max_bytes=max_bytes,
            sizeof=lambda key, record: text_bytes(key) + text_bytes(record.reference) + RECORD_BYTES)

    def __len__(self) -> int:
        return len(self.cache)

    def get_many(self, keys: Sequence[str]) -> list[QueryRecord | None]:
        return [self.cache.get(key) for key in keys]

    def put_many(self, items: Sequence[tuple[str, QueryRecord]]) -> None:
        for key, record in items:
            self.cache.put(key, record)


def redact_url(url: str) -> str:
    """The URL without its password, for logs and /readyz."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def connect_redis(url: str, timeout_s: float) -> aioredis.Redis:
    """A client that fails fast: bounded socket timeouts and no hidden retries."""
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0), decode_responses=True, health_check_interval=30,
    )


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0  # failed Redis round trips
    fallbacks: int = 0  # lookups answered in-process because Redis was unavailable


class QueryStore:
    """Redis when configured and healthy, else the in-process copy; never raises on lookup."""

    def __init__(self, memory: MemoryStore, redis_url: str | None = None, *,
                 timeout_s: float = 0.2, retry_s: float = 2.0) -> None:
        self.memory = memory
        self.redis_url = redis_url
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.stats = StoreStats()
        self._redis = connect_redis(redis_url, timeout_s) if redis_url else None
        self._down_until = 0.0
        self._last_error: str | None = None

    @property
    def kind(self) -> str:
        return "redis" if self._redis is not None else "memory"

    def status(self) -> dict[str, object]:
        status: dict[str, object] = {"kind": self.kind, "records_in_memory": len(self.memory)}
        if self._redis is None:
            status["status"] = "embedded"
        else:
            status["url"] = redact_url(self.redis_url or "")
            status["status"] = "degraded" if self._last_error else "ok"
            status["last_error"] = self._last_error
        return status

    async def get_many(self, keys: Sequence[str]) -> list[QueryRecord | None]:
        found = await self._redis_get_many(keys) if self._redis_usable() else None
        if found is None:
            found = self.memory.get_many(keys)
            self.stats.fallbacks += len(keys) if self._redis is not None else 0
        hits = sum(record is not None for record in found)
        self.stats.hits += hits
        self.stats.misses += len(keys) - hits
        return found

    async def put_many(self, records: Sequence[tuple[str, str, QueryRecord]]) -> None:
        """Write (key, query, record) triples — a classifier's answers — to the in-process copy
        and, when Redis is up, to Redis (fields merge: a stored reference stays, an older
        answer's probability goes). Never raises."""
        self.memory.put_many([(key, record) for key, _, record in records])
        if not records or not self._redis_usable():
            return
        assert self._redis is not None
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, query, record in records:
                        pipe.hset(key, mapping=record_to_fields(query, record))
                        if stale := stale_fields(record):
                            pipe.hdel(key, *stale)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as error:
            self._mark_down(error)
            return
        self._mark_up()

    def _redis_usable(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._down_until

    async def _redis_get_many(self, keys: Sequence[str]) -> list[QueryRecord | None] | None:
        assert self._redis is not None
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.hmget(key, *READ_FIELDS)
                    rows = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as error:
            self._mark_down(error)
            return None
        self._mark_up()
        found = [fields_to_record(*row) for row in rows]
        self.memory.put_many([(k, r) for k, r in zip(keys, found, strict=True) if r is not None])
        return found

    def _mark_down(self, error: BaseException) -> None:
        self.stats.errors += 1
        self._down_until = time.monotonic() + self.retry_s
        if self._last_error is None:  # log the transition once, not every failed lookup
            log.warning("Redis store unavailable (%s: %s); using the in-process store and the "
                        "default query type; retrying every %.1fs",
                        type(error).__name__, error, self.retry_s)
        self._last_error = f"{type(error).__name__}: {error}"

    def _mark_up(self) -> None:
        if self._last_error is not None:
            log.warning("Redis store reachable again")
            self._last_error = None

    async def ping(self) -> bool:
        """Check Redis now (used at start-up so /readyz tells the truth from the first call)."""
        if self._redis is None:
            return True
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                await self._redis.ping()
        except (RedisError, OSError, TimeoutError) as error:
            self._mark_down(error)
            return False
        self._mark_up()
        return True

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
