"""Asyncio driver: runs the core's flows over one pooled `httpx.AsyncClient`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import httpx

from . import _core
from ._core import ChunkResult, ClientBase, Done, Sleep, advance

if TYPE_CHECKING:
    from typing_extensions import Unpack

_T = TypeVar("_T")


class AsyncRewardClient(ClientBase[httpx.AsyncClient]):
    """Asyncio r3 client; up to `max_concurrency` chunks of a large batch are in flight at once.

    See `ClientBase` for the other options; `sleep` waits between attempts. Use it from one
    event loop (httpx's pool is bound to the loop that opened its connections).
    """

    def __init__(
        self,
        base_url: str = _core.DEFAULT_BASE_URL,
        *,
        max_concurrency: int = 8,
        http_client: httpx.AsyncClient | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        **options: Unpack[_core.ClientOptions],
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.max_concurrency = max_concurrency
        self._sleep = sleep
        super().__init__(base_url, http_client, lambda t: httpx.AsyncClient(timeout=t), **options)

    @overload
    async def score(
        self, items: _core.Items, *, backend: str | None = None, return_components: Literal[False] = False
    ) -> list[float]: ...
    @overload
    async def score(
        self, items: _core.Items, *, backend: str | None = None, return_components: Literal[True]
    ) -> _core.ScoredBatch: ...
    async def score(
        self, items: _core.Items, *, backend: str | None = None, return_components: bool = False
    ) -> list[float] | _core.ScoredBatch:
        """Like `RewardClient.score`; chunk answers are reassembled in item order."""
        plan = self._score_plan(items, backend, return_components)
        limit = asyncio.Semaphore(self.max_concurrency)

        async def bounded(flow: _core.Flow[ChunkResult]) -> ChunkResult:
            async with limit:
                return await self._run(flow)

        tasks = [asyncio.ensure_future(bounded(flow)) for flow in plan.flows]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            # One chunk failed for good: the batch is lost, so stop the others' retries.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return plan.merge(results)

    async def info(self) -> dict[str, Any]:
        """The service's `/v1/info` (backends, model, limits...)."""
        return await self._run(self._info_flow())

    async def ready(self) -> bool:
        """True when `/readyz` answers 200 right now; never raises on connection errors."""
        return await self._run(self._ready_flow())

    async def close(self) -> None:
        """Close the connection pool, unless the caller supplied it."""
        if self._owns_http:
            await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self, flow: _core.Flow[_T]) -> _T:
        step = advance(flow, None)
        while not isinstance(step, Done):
            step = advance(flow, await self._perform(step))
        return step.value

    async def _perform(self, step: _core.Step) -> _core.Outcome | None:
        if isinstance(step, Sleep):
            await self._sleep(step.seconds)
            return None
        try:
            return await self._http.request(step.method, step.url, headers=step.headers, content=step.content)
        except httpx.TransportError as exc:
            return exc
