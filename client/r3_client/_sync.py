"""Blocking driver: runs the core's flows over one pooled `httpx.Client`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import httpx

from . import _core
from ._core import ClientBase, Done, Sleep, advance

if TYPE_CHECKING:
    from typing_extensions import Unpack

_T = TypeVar("_T")


class RewardClient(ClientBase[httpx.Client]):
    """Blocking r3 client; chunks of a large batch are sent one after another.

    See `ClientBase` for the options; `sleep` waits between attempts. Thread-safe: the
    underlying `httpx.Client` is.
    """

    def __init__(
        self,
        base_url: str = _core.DEFAULT_BASE_URL,
        *,
        http_client: httpx.Client | None = None,
        sleep: Callable[[float], object] = time.sleep,
        **options: Unpack[_core.ClientOptions],
    ) -> None:
        super().__init__(base_url, http_client, lambda t: httpx.Client(timeout=t), **options)
        self._sleep = sleep

    @overload
    def score(
        self, items: _core.Items, *, backend: str | None = None, return_components: Literal[False] = False
    ) -> list[float]: ...
    @overload
    def score(
        self, items: _core.Items, *, backend: str | None = None, return_components: Literal[True]
    ) -> _core.ScoredBatch: ...
    def score(
        self, items: _core.Items, *, backend: str | None = None, return_components: bool = False
    ) -> list[float] | _core.ScoredBatch:
        """Rewards in item order (or a `_core.ScoredBatch`); no request at all for empty `items`."""
        plan = self._score_plan(items, backend, return_components)
        return plan.merge(self._run(flow) for flow in plan.flows)

    def get_reward(
        self,
        queries: Sequence[str],
        prompts: Sequence[str] | None = None,
        labels: Sequence[Any] | None = None,
        *,
        backend: str | None = None,
    ) -> dict[str, Any]:
        """OpenRLHF's `/get_reward` in one request: queries are prompt + response full texts,
        prompts their prefixes, labels reference strings or {"reference", "query_type"} objects;
        returns {"rewards", "scores", "extra_logs"} as lists of floats."""
        return self._run(self._get_reward_flow(queries, prompts, labels, backend))

    def info(self) -> dict[str, Any]:
        """The service's `/v1/info` (backends, model, limits...)."""
        return self._run(self._info_flow())

    def ready(self) -> bool:
        """True when `/readyz` answers 200 right now; never raises on connection errors."""
        return self._run(self._ready_flow())

    def close(self) -> None:
        """Close the connection pool, unless the caller supplied it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, flow: _core.Flow[_T]) -> _T:
        step = advance(flow, None)
        while not isinstance(step, Done):
            step = advance(flow, self._perform(step))
        return step.value

    def _perform(self, step: _core.Step) -> _core.Outcome | None:
        if isinstance(step, Sleep):
            self._sleep(step.seconds)
            return None
        try:
            return self._http.request(step.method, step.url, headers=step.headers, content=step.content)
        except httpx.TransportError as exc:
            return exc
