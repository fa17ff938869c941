"""LRU caches bounded in bytes as well as in entries, and the registry `/metrics` reads their sizes
from. A cache keyed by text (up to `R3_MAX_TEXT_CHARS` characters each) bounded only in entries
has no bound in memory: a training run that sends long, ever-new prompts fills it for days."""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from functools import wraps
from typing import Generic, ParamSpec, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
P = ParamSpec("P")
R = TypeVar("R")

# What an entry costs beyond its key and value: its OrderedDict node and the bookkeeping tuple.
ENTRY_OVERHEAD = 120

_MODULE_CACHES: list[LruCache] = []  # the process's memoized functions'


def text_bytes(text: str | None) -> int:
    """Memory of a str (0 for None): CPython's compact layout, 1, 2 or 4 bytes a character."""
    return sys.getsizeof(text) if text is not None else 0


class LruCache(Generic[K, V]):
    """Least-recently-used map, evicting past `max_entries` or `max_bytes` (each entry sized once,
    by `sizeof(key, value)`, when put). An entry larger than the whole byte bound is not kept.
    Thread-safe: the guards' caches are read from the event loop and from worker threads."""

    def __init__(self, name: str, *, max_entries: int, max_bytes: int,
                 sizeof: Callable[[K, V], int]) -> None:
        self.name = name
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._sizeof = sizeof
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return found[0]

    def put(self, key: K, value: V) -> None:
        size = self._sizeof(key, value) + ENTRY_OVERHEAD
        if self.max_entries <= 0 or size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._entries[key] = (value, size)
            self.bytes += size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = self.hits = self.misses = 0


def memoized(name: str, *, max_entries: int, max_bytes: int,
             sizeof: Callable[[R], int]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """`functools.lru_cache` bounded in bytes too: the value's `sizeof` plus its positional
    arguments' (texts, or small hashable settings)."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        cache: LruCache[tuple[object, ...], R] = LruCache(
            name, max_entries=max_entries, max_bytes=max_bytes,
            sizeof=lambda key, value: sum(text_bytes(k) for k in key if isinstance(k, str)) + sizeof(value))

        @wraps(function)
        def cached(*args: P.args, **kwargs: P.kwargs) -> R:
            assert not kwargs, "memoized functions take positional arguments"
            found = cache.get(args)
            if found is None:
                found = function(*args)
                cache.put(args, found)
            return found

        cached.cache = cache  # type: ignore[attr-defined]
        _MODULE_CACHES.append(cache)
        return cached

    return decorate


def module_caches() -> Iterator[LruCache]:
    """The memoized functions' caches (one per process), for `/metrics` beside an engine's own."""
    return iter(_MODULE_CACHES)
