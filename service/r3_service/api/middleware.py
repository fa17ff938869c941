"""ASGI middleware, outermost first: Observe (metrics) → ApiKeys → BodyLimit → Draining →
EarlyAdmission. Pure ASGI, so a client's disconnect still reaches the routes."""

from __future__ import annotations

import hmac
import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from r3_service.engine.admission import BodySize
from r3_service.engine.engine import RewardEngine
from r3_service.engine.scheduler import QueueFull
from r3_service.metrics import Metrics

ENDPOINTS = {"/reward", "/get_reward", "/slime", "/healthz", "/readyz", "/metrics", "/v1/info"}


class Observe:
    """Request count and latency per endpoint (pure ASGI, so disconnects still reach routes)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started = time.perf_counter()
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            self.metrics.requests.labels(endpoint, str(status)).inc()


OPEN_PATHS = {"/healthz", "/readyz"}  # orchestrators' probes: no key, answered while draining


class ApiKeys:
    """401 unless `Authorization: Bearer KEY` names a configured key. Every key is compared in
    constant time, so the answer's timing says nothing about how close a guess was."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._valid(scope):
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"detail": "missing or invalid API key: send Authorization: Bearer KEY"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _valid(self, scope: Scope) -> bool:
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        matches = [hmac.compare_digest(token.strip(), key) for key in self.keys]  # no short cut
        return scheme.lower() == b"bearer" and any(matches)


class Draining:
    """Once draining (SIGTERM), requests get 503 and `/readyz` says not ready, so a load balancer
    stops sending, while the requests already in flight finish; `state.in_flight` counts those."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state
        state.draining = False
        state.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.state.draining and scope["path"] != "/healthz":
            response = JSONResponse({"detail": "the service is shutting down; retry on another replica"},
                                    status_code=503, headers={"Retry-After": "1", "Connection": "close"})
            await response(scope, receive, send)
            return
        async def closing_send(message: Message) -> None:
            # A response finished while draining closes its connection: a client reusing it for
            # the next request would race the shutdown; a new connection gets a clean 503 instead.
            if message["type"] == "http.response.start" and self.state.draining:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        self.state.in_flight += 1
        try:
            await self.app(scope, receive, closing_send)
        finally:
            self.state.in_flight -= 1


class BodyLimit:
    """413 for bodies over the limit, by Content-Length or while streaming, before parsing."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": self._message()}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._message())  # FastAPI passes HTTPException through
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body exceeds the limit of {self.max_bytes} bytes (R3_MAX_BODY_BYTES)"


SCORING_PATHS = {"/reward", "/get_reward", "/slime"}


def body_size(scope: Scope) -> BodySize | None:
    """The declared size of a scoring request's body (None without a Content-Length)."""
    declared = dict(scope["headers"]).get(b"content-length", b"")
    return BodySize(scope["path"], int(declared)) if declared.isdigit() else None


def too_busy(error: QueueFull) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=429,
                        headers={"Retry-After": str(error.retry_after_s)})


class EarlyAdmission:
    """Admit a scoring request by its declared size before its body is read, or answer 429 at
    once (`RewardEngine.admit_early`): under a burst, refusals cost no parsing and come back in
    milliseconds, and requests still being read or parsed count against the queue bound. The
    route swaps this admission for the exact one; it is released here in any case. A refused
    connection closes, since its body was never read."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine: RewardEngine | None = getattr(self.state, "engine", None)
        body = body_size(scope) if scope["type"] == "http" and scope["path"] in SCORING_PATHS else None
        if engine is None or body is None:
            await self.app(scope, receive, send)
            return
        try:
            early = engine.admit_early(body)
        except QueueFull as error:
            response = too_busy(error)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        # The route hands both to the engine: the size is read once, here.
        scope.setdefault("state", {}).update(early_admission=early, body_size=body)
        try:
            await self.app(scope, receive, send)
        finally:
            early.release()
