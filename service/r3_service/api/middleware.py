"""ASGI middleware, outermost first: Observe (metrics) → ApiKeys → BodyLimit → Draining →
EarlyAdmission. Pure ASGI, so a client's disconnect still reaches the routes."""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import time

import orjson
from fastapi import HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import QueryParams, State
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from r3_service.api.early import reward_demand
from r3_service.api.routes import SCORING
from r3_service.engine.admission import demand
from r3_service.engine.backends import RewardBackend
from r3_service.engine.engine import RewardEngine, UnknownBackend
from r3_service.engine.scheduler import QueueFull
from r3_service.metrics import Metrics
from r3_service.settings import Settings

ENDPOINTS = {"/reward", "/get_reward", "/slime", "/healthz", "/readyz", "/metrics", "/v1/info"}


class Observe:
    """Request count and latency per endpoint (pure ASGI, so disconnects still reach routes)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # Each series labelled once: a lookup per request instead of prometheus' labels() call.
        self._latency = functools.cache(metrics.latency.labels)
        self._count = functools.cache(lambda endpoint, status: metrics.requests.labels(endpoint, str(status)))

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
            self._latency(endpoint).observe(time.perf_counter() - started)
            self._count(endpoint, status).inc()


OPEN_PATHS = {"/healthz", "/readyz"}  # orchestrators' probes: no key, answered while draining


class ApiKeys:
    """401 unless `Authorization: Bearer KEY` names a configured key, or `Basic` credentials do
    (the key as the password, or as the user name without one): a client that sends no headers
    of its own, such as slime, puts the key in its URL (`http://r3:KEY@HOST:8000/slime`) and its
    HTTP library sends it in this header, never in the request line that access logs print. Every
    key is compared in constant time, so the answer's timing says nothing about how close a guess
    was."""

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
        scheme, token = scheme.lower(), token.strip()
        if scheme == b"basic":
            token = basic_password(token)
        elif scheme != b"bearer":
            token = b""
        matches = [hmac.compare_digest(token, key) for key in self.keys]  # no short cut
        return bool(token) and any(matches)


def basic_password(credentials: bytes) -> bytes:
    """The password of `Basic` credentials (base64 of `user:password`), or the user name when the
    password is empty (`http://KEY@HOST/`); b"" when they do not decode."""
    try:
        user, _, password = base64.b64decode(credentials, validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return b""
    return password or user


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


def too_busy(error: QueueFull) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=429,
                        headers={"Retry-After": str(error.retry_after_s)})


def sent_as_json(scope: Scope) -> bool:
    """Whether FastAPI would read the body as JSON: no Content-Type, application/json or +json."""
    declared = dict(scope["headers"]).get(b"content-type")
    if declared is None:
        return True
    media = declared.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


async def read_body(receive: Receive) -> bytes | None:
    """The whole body (None if the client left while sending it)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` that hands the route the body read already, then what the client sends next
    (its disconnect, which the routes watch for)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def early_demand(scope: Scope, body: bytes, engine: RewardEngine,
                 settings: Settings) -> tuple[set[str], RewardBackend] | None:
    """The distinct texts the route will embed and their backend, read before the route runs:
    `/reward` by a C-level JSON parse and its shape (`early.reward_demand`), the other paths (one
    templated sample each, or a few) by the route's own model and steps. None when the route must
    answer instead (400, 413 or 422, exactly as without this middleware)."""
    if not sent_as_json(scope):
        return None
    try:
        if scope["path"] == "/reward":
            found = reward_demand(orjson.loads(body), settings)
            return None if found is None else (found[0], engine.backend(found[1]))
        schema, prepare_route = SCORING[scope["path"]]
        prepared = prepare_route(schema.model_validate_json(body), engine, settings,
                                 QueryParams(scope["query_string"]))
        return demand(prepared.items), prepared.backend
    except (orjson.JSONDecodeError, ValidationError, StarletteHTTPException, UnknownBackend):
        return None


class EarlyAdmission:
    """Admit a scoring request by its own work before its route runs, or answer 429 at once.

    The body is read (BodyLimit bounds it) and its texts found (`early_demand`: for `/reward` a
    C-level JSON parse, no validation yet), then admitted on its backend's model queues by the
    tokens its texts hold at least (`RewardEngine.admit`): the decision depends on this request
    alone, and a refusal costs a parse and a count, no validation, store lookup, classification
    or embedding. The route then validates the body with its strict model and scores it under
    this admission; a body it refuses gets its 400, 413 or 422. The admission is released here
    in any case."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine: RewardEngine | None = getattr(self.state, "engine", None)
        if scope["type"] != "http" or engine is None or scope["path"] not in SCORING:
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive)
        except StarletteHTTPException as error:  # BodyLimit: over the limit while streaming
            await JSONResponse({"detail": error.detail}, error.status_code)(scope, receive, send)
            return
        if body is None:  # the client left: counted as the routes count it (499), never delivered
            await Response(status_code=499)(scope, receive, send)
            return
        found = early_demand(scope, body, engine, self.state.settings)
        admission = None
        if found is not None:
            try:
                admission = engine.admit(*found)
            except QueueFull as error:
                await too_busy(error)(scope, receive, send)
                return
            scope.setdefault("state", {})["admission"] = admission
        try:
            await self.app(scope, replay(body, receive), send)
        finally:
            if admission is not None:
                admission.release()
