"""HTTP routes. Thin: validate, enforce limits, hand items to the engine, shape the answer."""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import State
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from r3_service.api.docs import mount_docs
from r3_service.api.openrlhf import SampleError, to_raw_items
from r3_service.api.schemas import (
    Components,
    ErrorResponse,
    GetRewardRequest,
    GetRewardResponse,
    RewardRequest,
    RewardResponse,
)
from r3_service.backends.r3 import Scored
from r3_service.engine.engine import BodySize, RawItem, RewardEngine, UnknownBackend
from r3_service.engine.scheduler import QueueFull
from r3_service.metrics import Metrics
from r3_service.settings import Settings
from r3_service.store.records import query_key, read_records

log = logging.getLogger("r3_service")

T = TypeVar("T")
ENDPOINTS = {"/reward", "/get_reward", "/healthz", "/readyz", "/metrics", "/v1/info"}
ERRORS = {400: {"model": ErrorResponse, "description": "The body is not JSON: invalid JSON, not UTF-8, "
                                                       "or not sent as application/json"},
          401: {"model": ErrorResponse, "description": "Missing or invalid API key (when keys are set)"},
          413: {"model": ErrorResponse, "description": "Over a configured limit"},
          422: {"description": "Invalid input; the message names the field"},
          429: {"model": ErrorResponse, "description": "Queue full; retry after `Retry-After` seconds"}}


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


class ClientGone(Exception):
    """The client disconnected before its answer: nothing to send, nothing went wrong."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first (its queued texts are dropped)."""
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if gone:  # an ordinary event, not a crash for uvicorn to log with a traceback
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


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


SCORING_PATHS = {"/reward", "/get_reward"}


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
        scope.setdefault("state", {})["early_admission"] = early
        try:
            await self.app(scope, receive, send)
        finally:
            early.release()


def check_limits(settings: Settings, count: int, texts: dict[str, str | None]) -> None:
    """413 naming the limit: items per request, then characters per text."""
    if count > settings.max_items:
        raise HTTPException(413, f"{count} items exceed the limit of {settings.max_items} items "
                                 "per request (R3_MAX_ITEMS)")
    for field, text in texts.items():
        if text is not None and len(text) > settings.max_text_chars:
            raise HTTPException(413, f"{field} has {len(text)} characters, over the limit of "
                                     f"{settings.max_text_chars} (R3_MAX_TEXT_CHARS)")


def not_json_detail(error: RequestValidationError) -> str | None:
    """The 400 message when the body is not a JSON document at all (None when it is JSON of
    the wrong shape, a 422)."""
    for e in error.errors():
        if e["type"] == "json_invalid":
            position = e["loc"][1] if len(e["loc"]) > 1 else "?"
            reason = (e.get("ctx") or {}).get("error", "invalid JSON")
            return f"the body is not valid JSON: {reason} at character {position}"
    if isinstance(error.body, bytes):  # FastAPI did not parse it: not sent as JSON
        return "the body is not JSON: send it with Content-Type: application/json"
    return None


def components(scored: Scored) -> Components:
    return Components(
        length_incentive=scored.length_incentive,
        repetition_penalty=scored.repetition_penalty,
        relevance=scored.relevance,
        relevance_target=scored.relevance_target,
        query_type=scored.query_type,
        query_type_source=scored.query_type_source,  # type: ignore[arg-type]
        reference_source=scored.reference_source,  # type: ignore[arg-type]
        members=scored.members,
    )


def extra_logs(results: list[Scored], uses_relevance: bool) -> dict[str, list[float]]:
    """Numeric per-sample logs, as OpenRLHF averages them into its training metrics."""
    logs = {
        "length_incentive": [r.length_incentive for r in results],
        "repetition_penalty": [r.repetition_penalty for r in results],
        "closed_branch": [float(r.relevance_target == "reference") for r in results],
    }
    if uses_relevance:
        logs["relevance"] = [r.relevance or 0.0 for r in results]
    for member in results[0].members or {} if results else {}:
        logs[f"reward_{member}"] = [(r.members or {})[member] for r in results]
    return logs


def preload(engine: RewardEngine, path: str) -> None:
    records, errors = read_records(Path(path))
    for error in errors:
        log.warning("R3_QTYPES_FILE %s: %s", path, error)
    engine.store.memory.put_many([(query_key(query), record) for query, record in records])
    log.info("loaded %d query records from %s into the in-process store", len(records), path)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = await asyncio.to_thread(RewardEngine.from_settings, settings, metrics)
        if settings.qtypes_file:
            await asyncio.to_thread(preload, engine, settings.qtypes_file)
        await engine.store.ping()
        engine.start()
        # The ~400k objects of the loaded models never die: out of the collector's sight, a full
        # collection takes ~0 ms instead of ~230 ms (2-core CPU), a pause that held up every
        # request of a burst at once.
        gc.collect()
        gc.freeze()
        app.state.engine = engine
        log.info("r3 ready: backends=%s (default %s), models=%s, store=%s", ",".join(engine.backends),
                 settings.default_backend, ",".join(m["model"] for m in engine.models()), engine.store.kind)
        yield
        await engine.close()

    app = FastAPI(title="r3", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="R3 (Regularized Relevance Reward) scoring for RL fine-tuning of LLMs.")
    mount_docs(app)
    # Outermost last: Observe → ApiKeys → BodyLimit → Draining → EarlyAdmission → routes.
    app.add_middleware(EarlyAdmission, state=app.state)
    app.add_middleware(Draining, state=app.state)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_keys:
        app.add_middleware(ApiKeys, keys=settings.api_keys)
    app.add_middleware(Observe, metrics=metrics)

    def engine_of(request: Request) -> RewardEngine:
        engine = getattr(request.app.state, "engine", None)
        if engine is None:
            raise HTTPException(503, "the model is still loading")
        return engine

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        not_json = not_json_detail(error)
        if not_json is not None:
            return JSONResponse({"detail": not_json}, status_code=400)
        # FastAPI's default echoes the input back, which can be megabytes of user text.
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if isinstance(error.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body"
            return JSONResponse({"detail": "the body is not JSON: it is not valid UTF-8 text"}, 400)
        return await http_exception_handler(request, error)

    @app.exception_handler(QueueFull)
    async def overloaded(request: Request, error: QueueFull) -> JSONResponse:
        return too_busy(error)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; never delivered

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    async def score(request: Request, items: list[RawItem], backend: str | None,
                    endpoint: str) -> tuple[str, list[Scored]]:
        engine = engine_of(request)
        try:
            name = engine.backend(backend).name
        except UnknownBackend as error:
            raise HTTPException(422, str(error)) from None
        scoring = engine.score(items, name, body_size(request.scope),
                               getattr(request.state, "early_admission", None))
        results = await unless_disconnected(request, scoring)
        metrics.items.labels(endpoint, name).inc(len(items))
        return name, results

    @app.post("/reward", response_model=RewardResponse, responses=ERRORS)
    async def reward(body: RewardRequest, request: Request) -> RewardResponse:
        """Score (query, response) items with R3; rewards come back in item order."""
        check_limits(settings, len(body.items), {
            f"items[{i}].{field}": getattr(item, field)
            for i, item in enumerate(body.items) for field in ("query", "response", "reference")
        })
        items = [RawItem(i.query, i.response, i.reference, i.query_type) for i in body.items]
        name, results = await score(request, items, body.backend, "/reward")
        return RewardResponse(
            rewards=[r.reward for r in results], backend=name,
            components=[components(r) for r in results] if body.return_components else None,
        )

    @app.post("/get_reward", response_model=GetRewardResponse, responses=ERRORS)
    async def get_reward(body: GetRewardRequest, request: Request) -> GetRewardResponse:
        """OpenRLHF remote reward model: `--remote_rm_url http://HOST:PORT/get_reward`."""
        texts: dict[str, str | None] = {f"query[{i}]": q for i, q in enumerate(body.query)}
        texts |= {f"prompts[{i}]": p for i, p in enumerate(body.prompts or [])}
        texts |= {f"labels[{i}]": label if isinstance(label, str) else label and label.reference
                  for i, label in enumerate(body.labels or [])}
        check_limits(settings, len(body.query), texts)
        try:
            items = to_raw_items(body)
        except SampleError as error:
            raise HTTPException(422, str(error)) from None
        name, results = await score(request, items, body.backend, "/get_reward")
        rewards = [r.reward for r in results]
        uses_relevance = engine_of(request).backend(name).uses_relevance
        return GetRewardResponse(rewards=rewards, scores=rewards,
                                 extra_logs=extra_logs(results, uses_relevance))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "Model not loaded yet"}})
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: the model is loaded; also says which store is in use and its health."""
        engine = getattr(request.app.state, "engine", None)
        if engine is None:
            return JSONResponse({"ready": False, "detail": "the model is still loading"}, 503)
        return JSONResponse({"ready": True, "models": [{"model": m["model"], "device": m["device"]}
                                                       for m in engine.models()],
                             "store": engine.store.status()})

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def info(request: Request) -> dict[str, object]:
        """The scoring settings in force: every backend with its settings, and the loaded models."""
        engine = engine_of(request)
        return {**engine.info(), "models": engine.models()}

    return app
