"""Reward calls: a whole batch per request, on a background event loop so the GPU keeps working.

`RewardScorer.submit` returns at once; `PendingRewards.result` blocks until the scores arrive.
The client retries transient failures (connect errors, timeouts, 429, 5xx) with backoff; on top
of that the scorer keeps trying until `deadline_s` after submission, then raises
`RewardServiceError`. A batch is scored whole or not at all: a missing reward is never replaced.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from r3_client import (
    RETRY_STATUSES,
    AsyncRewardClient,
    R3ClientError,
    R3HTTPError,
    RewardItem,
    ScoredBatch,
)


class RewardServiceError(RuntimeError):
    """The reward service could not score a batch in time (or refused it for good)."""

    def __init__(
        self, url: str, last_error: str, waited_s: float, deadline_s: float, permanent: bool = False
    ) -> None:
        self.url = url
        self.last_error = last_error
        self.checkpoint: str | None = None
        why = ("refused the batch" if permanent
               else f"gave no rewards within reward_deadline_s={deadline_s:g}s")
        super().__init__(f"reward service {url} {why} (waited {waited_s:.1f}s); last error: {last_error}")


@dataclass
class ScoredRewards:
    batch: ScoredBatch
    latency_s: float  # submission to arrival, retries included


class PendingRewards:
    """A batch in flight; `result()` waits for it."""

    def __init__(self, future: concurrent.futures.Future[ScoredRewards]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> ScoredRewards:
        return self._future.result()

    def cancel(self) -> None:
        self._future.cancel()


class RewardScorer:
    """Owns an `AsyncRewardClient` on a private event loop thread (httpx pools are loop-bound)."""

    def __init__(
        self, url: str, *, backend: str | None, deadline_s: float, timeout_s: float = 180.0,
        max_retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 20.0,
        chunk_size: int = 512, max_concurrency: int = 8, api_key: str | None = None,
    ) -> None:
        self.url = url
        self.backend = backend
        self.deadline_s = deadline_s
        self._retry_pause = max(backoff_s, 0.05)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="r3-rewards", daemon=True)
        self._thread.start()

        async def make() -> AsyncRewardClient:
            return AsyncRewardClient(
                url, max_concurrency=max_concurrency, timeout=timeout_s, max_retries=max_retries,
                backoff=backoff_s, max_backoff=max_backoff_s, chunk_size=chunk_size, api_key=api_key,
            )

        self._client = asyncio.run_coroutine_threadsafe(make(), self._loop).result()

    def submit(self, items: Sequence[RewardItem], backend: str | None = None) -> PendingRewards:
        """Start scoring `items` (with components) and return at once; `backend`: another preset
        than the trained-on one (held-out evaluation scores with several)."""
        coroutine = self._score(list(items), backend or self.backend, time.monotonic())
        return PendingRewards(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    def score(self, items: Sequence[RewardItem]) -> ScoredRewards:
        return self.submit(items).result()

    async def _score(self, items: list[RewardItem], backend: str | None, started: float) -> ScoredRewards:
        deadline = started + self.deadline_s
        last_error = "no attempt finished"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RewardServiceError(self.url, last_error, time.monotonic() - started, self.deadline_s)
            try:
                batch = await asyncio.wait_for(
                    self._client.score(items, backend=backend, return_components=True), remaining
                )
                return ScoredRewards(batch, time.monotonic() - started)
            except R3HTTPError as exc:
                if exc.status not in RETRY_STATUSES:  # a 4xx: our request is wrong; waiting won't help
                    raise RewardServiceError(self.url, str(exc), time.monotonic() - started,
                                             self.deadline_s, True) from exc
                last_error = str(exc)
            except R3ClientError as exc:
                last_error = str(exc)
            except TimeoutError:
                last_error = f"no answer before the deadline (after: {last_error})"
                continue
            await asyncio.sleep(min(self._retry_pause, max(deadline - time.monotonic(), 0)))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
