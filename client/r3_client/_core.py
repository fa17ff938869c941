"""Sans-IO core shared by the sync and async clients.

Everything that does not touch the network lives here: item normalisation, chunking, request
building, response parsing and the retry decision. A call is a generator ("flow") that yields
`Request` (send it, then send back the response or the `httpx.TransportError` raised) or
`Sleep` (wait, then send back None) and returns the parsed result; `advance` steps it. The
drivers in `_sync` / `_async` only perform the steps, so both clients share one behaviour.
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Literal, Protocol, TypeAlias, TypedDict, TypeVar

import httpx

__version__ = "0.1.0"

DEFAULT_BASE_URL = "http://127.0.0.1:8000"

#: Statuses worth another attempt: overload (429), transient server failure, start/stop (503).
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

#: Transport failures worth another attempt. Scoring is idempotent, so a request that may have
#: reached the server is safe to resend. A bad URL scheme or a local protocol misuse is not.
RETRY_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)

_T = TypeVar("_T")
_H = TypeVar("_H", httpx.Client, httpx.AsyncClient)


# --------------------------------------------------------------------------- public data types


@dataclass(frozen=True)
class RewardItem:
    """One (query, response) pair to score; reference and query type are optional hints."""

    query: str
    response: str
    reference: str | None = None
    query_type: str | None = None


ItemLike: TypeAlias = RewardItem | Mapping[str, Any] | Sequence[Any]
Items: TypeAlias = Iterable[ItemLike]


@dataclass(frozen=True)
class Components:
    """Per-item breakdown of a reward, as computed by the service."""

    length_incentive: float
    repetition_penalty: float
    query_type: Literal["open", "closed"]
    query_type_source: Literal["request", "cache", "classifier", "default", "random"]
    relevance: float | None = None
    relevance_target: Literal["query", "reference"] | None = None
    reference_source: Literal["request", "cache"] | None = None
    members: dict[str, float] | None = None  # an ensemble's member rewards, each standardised
    query_type_confidence: float | None = None  # the classifier's probability of query_type
    open_branch_weight: float | None = None  # p(open) when the soft branch blended both branches
    unpaid: dict[str, float] | None = None  # a guarded preset's unpaid share of words, by reason

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Components:
        """Build from the wire format; unknown keys are ignored so newer servers stay usable."""
        relevance, members, unpaid = data.get("relevance"), data.get("members"), data.get("unpaid")
        return cls(
            length_incentive=float(data["length_incentive"]),
            repetition_penalty=float(data["repetition_penalty"]),
            query_type=data["query_type"],
            query_type_source=data["query_type_source"],
            relevance=_optional_float(relevance),
            relevance_target=data.get("relevance_target"),
            reference_source=data.get("reference_source"),
            members=None if members is None else {str(k): float(v) for k, v in members.items()},
            query_type_confidence=_optional_float(data.get("query_type_confidence")),
            open_branch_weight=_optional_float(data.get("open_branch_weight")),
            unpaid=None if unpaid is None else {str(k): float(v) for k, v in unpaid.items()},
        )


@dataclass(frozen=True)
class ScoredBatch:
    """Rewards with their components, returned by `score(..., return_components=True)`."""

    rewards: list[float]
    components: list[Components]
    backend: str


class R3ClientError(Exception):
    """Any failure of the r3 client: transport errors, bad input, malformed answers."""


class R3HTTPError(R3ClientError):
    """The service answered with an error status (after any retries)."""

    def __init__(
        self, status: int, detail: Any, *, method: str = "", url: str = "", attempts: int = 1
    ) -> None:
        self.status = status
        self.detail = detail
        self.method = method
        self.url = url
        self.attempts = attempts
        where = f"{method} {url} " if method else ""
        super().__init__(f"r3 {where}failed with HTTP {status} after {_attempts(attempts)}: {detail}")


def _attempts(n: int) -> str:
    return f"{n} attempt{'s' if n != 1 else ''}"


# --------------------------------------------------------------------------- flow protocol


@dataclass(frozen=True)
class Request:
    """A fully built HTTP request, ready for any driver to send."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None


@dataclass(frozen=True)
class Sleep:
    """Ask the driver to wait before the next attempt."""

    seconds: float


class ResponseLike(Protocol):
    """What the core reads from a response (an `httpx.Response` fits)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content(self) -> bytes: ...


Outcome: TypeAlias = ResponseLike | httpx.TransportError
Step: TypeAlias = Request | Sleep
Flow: TypeAlias = Generator[Step, Any, _T]


@dataclass(frozen=True)
class Done(Generic[_T]):
    """A finished flow's result."""

    value: _T


def advance(flow: Flow[_T], reply: Any) -> Step | Done[_T]:
    """Feed `reply` to `flow` (None to start it); its next step, or `Done` when it returned."""
    try:
        return flow.send(reply)
    except StopIteration as stop:
        return Done(stop.value)


# --------------------------------------------------------------------------- retry policy


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; a server's Retry-After wins, capped at `max_backoff`."""

    max_retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 20.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Wait before retry number `retry` (1-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        ceiling = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        # "Equal jitter": at least half the exponential step, so clients that failed together
        # spread out without retrying immediately.
        return ceiling / 2 + random.uniform(0, ceiling / 2)


# --------------------------------------------------------------------------- items and payloads


def _optional_str(value: Any, name: str, index: int) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"item {index}: {name} must be a str or None, got {type(value).__name__}")


def to_item(item: ItemLike, index: int = 0) -> RewardItem:
    """Coerce a RewardItem, a mapping with the same keys or a (query, response[, ...]) tuple."""
    if isinstance(item, RewardItem):
        fields = (item.query, item.response, item.reference, item.query_type)
    elif isinstance(item, Mapping):
        try:
            fields = (item["query"], item["response"], item.get("reference"), item.get("query_type"))
        except KeyError as exc:
            raise TypeError(f"item {index}: missing key {exc}") from None
    elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and 2 <= len(item) <= 4:
        fields = (*item, None, None)[:4]
    else:
        raise TypeError(
            f"item {index}: expected RewardItem, mapping or (query, response) tuple, "
            f"got {type(item).__name__}"
        )
    query, response, reference, query_type = fields
    if not isinstance(query, str) or not isinstance(response, str):
        raise TypeError(f"item {index}: query and response must be str")
    return RewardItem(
        query,
        response,
        _optional_str(reference, "reference", index),
        _optional_str(query_type, "query_type", index),
    )


def item_payload(item: RewardItem) -> dict[str, str]:
    """Wire form of an item; None fields are omitted (the server treats them as absent)."""
    out = {"query": item.query, "response": item.response}
    if item.reference is not None:
        out["reference"] = item.reference
    if item.query_type is not None:
        out["query_type"] = item.query_type
    return out


def _decode_json(response: ResponseLike, what: str) -> Any:
    try:
        return json.loads(response.content)
    except ValueError as exc:
        raise R3ClientError(f"r3 {what}: response is not JSON: {exc}") from None


def error_detail(response: ResponseLike) -> Any:
    """The `detail` of an error body, or its (truncated) text when it is not the usual JSON."""
    try:
        body = json.loads(response.content)
    except ValueError:
        text = response.content.decode("utf-8", "replace").strip()
        return text[:500] or "<empty body>"
    if isinstance(body, Mapping) and "detail" in body:
        return body["detail"]
    return body


@dataclass(frozen=True)
class ChunkResult:
    rewards: list[float]
    components: list[Components] | None
    backend: str


def parse_reward_response(response: ResponseLike, expected: int, return_components: bool) -> ChunkResult:
    """Validate a `/reward` answer; a wrong count would silently misalign rewards, so it raises."""
    body = _decode_json(response, "POST /reward")
    try:
        rewards = [float(r) for r in body["rewards"]]
        backend = str(body.get("backend", ""))
        raw_components = body.get("components") if return_components else None
        components = None if raw_components is None else [Components.from_dict(c) for c in raw_components]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise R3ClientError(f"r3 POST /reward: malformed response: {exc!r}") from None
    if len(rewards) != expected:
        raise R3ClientError(f"r3 POST /reward: sent {expected} items, got {len(rewards)} rewards")
    if return_components and (components is None or len(components) != expected):
        raise R3ClientError("r3 POST /reward: components were requested but not returned in full")
    return ChunkResult(rewards, components, backend)


def parse_get_reward_response(response: ResponseLike, expected: int) -> dict[str, Any]:
    """Validate a `/get_reward` answer (OpenRLHF's contract): rewards, scores and per-sample
    extra_logs, each as long as the batch."""
    body = _decode_json(response, "POST /get_reward")
    try:
        rewards = [float(r) for r in body["rewards"]]
        scores = [float(r) for r in body.get("scores", rewards)]
        logs = {str(k): [float(v) for v in values] for k, values in (body.get("extra_logs") or {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise R3ClientError(f"r3 POST /get_reward: malformed response: {exc!r}") from None
    if not len(rewards) == len(scores) == expected or any(len(v) != expected for v in logs.values()):
        raise R3ClientError(f"r3 POST /get_reward: sent {expected} queries, got {len(rewards)} rewards")
    return {"rewards": rewards, "scores": scores, "extra_logs": logs}


@dataclass(frozen=True)
class ScorePlan:
    """The flows of one `score` call (one per chunk) and how to merge their results."""

    flows: list[Flow[ChunkResult]]
    return_components: bool
    backend: str | None

    def merge(self, results: Iterable[ChunkResult]) -> list[float] | ScoredBatch:
        results = list(results)
        rewards = [r for chunk in results for r in chunk.rewards]
        if not self.return_components:
            return rewards
        components = [c for chunk in results for c in chunk.components or ()]
        backend = results[0].backend if results else (self.backend or "")
        return ScoredBatch(rewards=rewards, components=components, backend=backend)


# --------------------------------------------------------------------------- the shared client


class ClientOptions(TypedDict, total=False):
    """Keyword options shared by `RewardClient` and `AsyncRewardClient`."""

    timeout: float
    max_retries: int
    backoff: float
    max_backoff: float
    chunk_size: int
    api_key: str | None
    deadline: float | None


class ClientBase(Generic[_H]):
    """Configuration and flows shared by both clients; subclasses only drive the I/O.

    Options: `timeout` (seconds per attempt; only applied to the HTTP client made here),
    `max_retries` (extra attempts after the first on retryable failures), `backoff` /
    `max_backoff` (first and largest wait, seconds), `chunk_size` (items per request),
    `api_key` (sent as a Bearer token), `http_client` (your own pooled client; not closed by us),
    `deadline` (seconds for all attempts of one request together: no retry is started that would
    sleep past it; None: only `max_retries` bounds them).
    """

    def __init__(
        self,
        base_url: str,
        http_client: _H | None,
        make_http_client: Callable[[httpx.Timeout], _H],
        *,
        timeout: float = 180.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        chunk_size: int = 512,
        api_key: str | None = None,
        deadline: float | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if deadline is not None and not deadline > 0:
            raise ValueError("deadline must be > 0 seconds (or None)")
        self.deadline = deadline
        self.base_url = base_url.rstrip("/")
        self.chunk_size = chunk_size
        self.retry_policy = RetryPolicy(max_retries, backoff, max_backoff)
        self._headers = {
            "Accept": "application/json",
            "User-Agent": f"r3-client/{__version__}",
        }
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._owns_http = http_client is None
        self._http: _H = make_http_client(httpx.Timeout(timeout)) if http_client is None else http_client

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    # -- request building

    def _request(self, method: str, path: str, body: Any = None) -> Request:
        headers = dict(self._headers)
        content = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            content = json.dumps(body, ensure_ascii=False).encode("utf-8")
        return Request(method, self.base_url + path, headers, content)

    # -- flows

    def _call(self, request: Request, parse: Callable[[ResponseLike], _T]) -> Flow[_T]:
        """Send `request` until it succeeds or the policy gives up, then parse the answer."""
        policy = self.retry_policy
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            outcome: Outcome = yield request
            if isinstance(outcome, httpx.TransportError):
                retry = isinstance(outcome, RETRY_TRANSPORT_ERRORS)
                wait = policy.delay(attempt)
                late = self._past_deadline(started, wait) if retry else ""
                if not retry or attempt > policy.max_retries or late:
                    raise R3ClientError(
                        f"r3 {request.method} {request.url} failed after {_attempts(attempt)}{late}: "
                        f"{type(outcome).__name__}: {outcome}"
                    ) from outcome
                yield Sleep(wait)
                continue
            status = outcome.status_code
            if 200 <= status < 300:
                return parse(outcome)
            retry_after = parse_retry_after(outcome.headers.get("retry-after"))
            wait = policy.delay(attempt, retry_after)
            late = self._past_deadline(started, wait) if status in RETRY_STATUSES else ""
            if status not in RETRY_STATUSES or attempt > policy.max_retries or late:
                detail = error_detail(outcome)
                raise R3HTTPError(
                    status,
                    f"{detail}{late}" if late else detail,
                    method=request.method,
                    url=request.url,
                    attempts=attempt,
                )
            yield Sleep(wait)

    def _past_deadline(self, started: float, wait: float) -> str:
        """Why no retry after `wait` more seconds fits the deadline; "" when one does."""
        if self.deadline is None:
            return ""
        elapsed = time.monotonic() - started
        if elapsed + wait <= self.deadline:
            return ""
        return (f" (gave up after {elapsed:.1f}s: a retry in {wait:.1f}s would pass the "
                f"{self.deadline:g}s deadline)")

    def _score_plan(self, items: Items, backend: str | None, return_components: bool) -> ScorePlan:
        normalised = [item_payload(to_item(item, i)) for i, item in enumerate(items)]
        flows = []
        for start in range(0, len(normalised), self.chunk_size):
            chunk = normalised[start : start + self.chunk_size]
            body = {"items": chunk, "backend": backend, "return_components": return_components}
            parse = partial(parse_reward_response, expected=len(chunk), return_components=return_components)
            flows.append(self._call(self._request("POST", "/reward", body), parse))
        return ScorePlan(flows, return_components, backend)

    def _get_reward_flow(
        self, queries: Sequence[str], prompts: Sequence[str] | None, labels: Sequence[Any] | None,
        backend: str | None,
    ) -> Flow[dict[str, Any]]:
        """One `/get_reward` request for the whole batch (the service splits prompt and response)."""
        body: dict[str, Any] = {"query": list(queries), "backend": backend}
        if prompts is not None:
            body["prompts"] = list(prompts)
        if labels is not None:
            body["labels"] = list(labels)
        parse = partial(parse_get_reward_response, expected=len(body["query"]))
        return self._call(self._request("POST", "/get_reward", body), parse)

    def _info_flow(self) -> Flow[dict[str, Any]]:
        def parse(response: ResponseLike) -> dict[str, Any]:
            body = _decode_json(response, "GET /v1/info")
            if not isinstance(body, dict):
                raise R3ClientError("r3 GET /v1/info: expected a JSON object")
            return body

        return self._call(self._request("GET", "/v1/info"), parse)

    def _ready_flow(self) -> Flow[bool]:
        """One probe, no retries: readiness is a question about right now."""
        outcome: Outcome = yield self._request("GET", "/readyz")
        return not isinstance(outcome, httpx.TransportError) and outcome.status_code == 200


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
