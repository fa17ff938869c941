"""ASGI middleware, outermost first: Observe (metrics) → ApiKeys → Draining → Admit (body limit,
one parse, admission). Pure ASGI, so a client's disconnect still reaches the routes."""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import time
from typing import Any

import orjson
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import QueryParams, State
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from r3_service.api.early import reward_demand
from r3_service.api.routes import SCORING, Prepared
from r3_service.engine.admission import Admission, demand
from r3_service.engine.engine import RewardEngine
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
    was. The key's tenant name goes to `scope["state"]["tenant"]` (admission shares by it)."""

    def __init__(self, app: ASGIApp, tenants: dict[str, str]) -> None:
        self.app = app
        self.tenants = [(key.encode(), name) for key, name in tenants.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        tenant = self._tenant(scope)
        if tenant is not None:
            scope.setdefault("state", {})["tenant"] = tenant
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"detail": "missing or invalid API key: send Authorization: Bearer KEY"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _tenant(self, scope: Scope) -> str | None:
        """The name of the key the request carries; None when it carries none of them."""
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        scheme, token = scheme.lower(), token.strip()
        if scheme == b"basic":
            token = basic_password(token)
        elif scheme != b"bearer":
            token = b""
        matches = [name for key, name in self.tenants if hmac.compare_digest(token, key)]  # no short cut
        return matches[0] if token and matches else None


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


def too_busy(error: QueueFull) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=429,
                        headers={"Retry-After": str(error.retry_after_s)})


def sent_as_json(scope: Scope) -> bool:
    """Whether FastAPI reads the body as JSON: Content-Type application/json or application/*+json."""
    declared = dict(scope["headers"]).get(b"content-type", b"")
    kind, _, subtype = declared.split(b";", 1)[0].strip().lower().partition(b"/")
    return kind == b"application" and (subtype == b"json" or subtype.endswith(b"+json"))


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body (None if the client left while sending it), or a 413 HTTPException for one
    over `limit` bytes, by its Content-Length or while streaming, reading no further."""
    declared = dict(scope["headers"]).get(b"content-length", b"")
    size, chunks = int(declared) if declared.isdigit() else 0, []  # declared, else read so far
    while size <= limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += 0 if declared.isdigit() else len(chunks[-1])
        if size <= limit and not message.get("more_body", False):
            return b"".join(chunks)
    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes (R3_MAX_BODY_BYTES)")


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


def parse(scope: Scope, body: bytes) -> Any:
    """The JSON document as FastAPI's `json.loads` reads it (orjson first, C-level and stricter;
    what it refuses, such as NaN or a lone surrogate, read as FastAPI would), or ValueError."""
    if not sent_as_json(scope):
        raise ValueError("not sent as JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def admit(scope: Scope, body: bytes, engine: RewardEngine, settings: Settings) -> tuple[Prepared, Admission]:
    """The body parsed, validated with its route's model, prepared for the engine and admitted on
    the queues of its backend. A `/reward` body is charged from a cheap read of its parsed form
    (`reward_demand`) before validation, so that a refusal costs none. Raises QueueFull (429),
    HTTPException (a limit passed, 413; an unknown backend, 422), or ValueError when the body is not
    JSON or not valid (FastAPI then answers 400 or 422)."""
    schema, prepare = SCORING[scope["path"]]
    document = parse(scope, body)

    def prepared() -> Prepared:
        return prepare(schema.model_validate(document), engine, settings, QueryParams(scope["query_string"]))

    early = reward_demand(document, settings) if scope["path"] == "/reward" else None
    backend = engine.backends.get(early[1] or settings.default_backend) if early else None
    if early is None or backend is None:  # validated first: what it finds is answered, not refused
        ready: Prepared | None = prepared()
        texts, backend = demand(ready.items), ready.backend
    else:
        ready, texts = None, early[0]
    admission = engine.admit(texts, backend, scope.get("state", {}).get("tenant", ""))
    try:
        return ready or prepared(), admission
    except Exception:
        admission.release()
        raise


class EarlyAdmission:
    """Read a scoring request's body (up to R3_MAX_BODY_BYTES), parse, validate and prepare it
    once, and admit it on its backend's model queues by what it asks of them (`admit`), or answer
    at once: 429 when they are full, 413 or 422 for a limit passed or an unknown backend. The route
    scores the prepared items (`scope["state"]["prepared"]`; FastAPI gets the validated body back)
    under this admission, which is released here in any case. A body that is not JSON or not
    valid goes to FastAPI as it came, which answers it (400, 422)."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in SCORING:
            await self.app(scope, receive, send)
            return
        engine: RewardEngine | None = getattr(self.state, "engine", None)
        found = None
        try:
            body = await read_body(scope, receive, self.state.settings.max_body_bytes)
            if body is None:  # the client left: counted as the routes count it (499), never delivered
                await Response(status_code=499)(scope, receive, send)
                return
            if engine is not None:  # else the route answers 503
                found = admit(scope, body, engine, self.state.settings)
        except ValueError:  # not JSON, or not valid: FastAPI answers it as it came (400, 422)
            pass
        except QueueFull as error:
            await too_busy(error)(scope, receive, send)
            return
        except HTTPException as error:
            await JSONResponse({"detail": error.detail}, error.status_code)(scope, receive, send)
            return
        if found is not None:
            scope.setdefault("state", {}).update(prepared=found[0], admission=found[1])
        try:
            await self.app(scope, replay(body, receive), send)
        finally:
            if found is not None:
                found[1].release()
