"""The app factory: lifespan (the engine is built off the event loop, then started), error
handlers, middleware and the routes."""

from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from r3_service import __version__, allocator
from r3_service.api.docs import mount_docs
from r3_service.api.middleware import ApiKeys, Draining, EarlyAdmission, Observe
from r3_service.api.routes import ClientGone, router
from r3_service.engine.engine import RewardEngine
from r3_service.metrics import Metrics
from r3_service.rule.datasets import read_records
from r3_service.settings import Settings
from r3_service.store.records import query_key

log = logging.getLogger("r3_service")


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


def preload(engine: RewardEngine, path: str) -> None:
    records, errors = read_records(Path(path))
    for error in errors:
        log.warning("R3_QTYPES_FILE %s: %s", path, error)
    engine.store.memory.put_many([(query_key(query), record) for query, record in records])
    log.info("loaded %d query records from %s into the in-process store", len(records), path)




async def trim_every(seconds: float) -> None:
    """Give the C heap's free pages back to the system now and then (allocator.trim)."""
    while True:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(allocator.trim)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if settings.tracemalloc:
        tracemalloc.start()
    applied = allocator.tune(settings.malloc_arena_max)  # before the model's threads start
    engine = await asyncio.to_thread(RewardEngine.from_settings, settings, app.state.metrics)
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
    log.info("r3 ready: backends=%s (default %s), models=%s, store=%s, malloc %s",
             ",".join(engine.backends), settings.default_backend,
             ",".join(m["model"] for m in engine.models()), engine.store.kind, applied or "as is")
    trimming = asyncio.ensure_future(trim_every(settings.malloc_trim_s)) if settings.malloc_trim_s else None
    yield
    if trimming is not None:
        trimming.cancel()
    await engine.close()


async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    not_json = not_json_detail(error)
    if not_json is not None:
        return JSONResponse({"detail": not_json}, status_code=400)
    # FastAPI's default echoes the input back, which can be megabytes of user text.
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


async def http_error(request: Request, error: StarletteHTTPException) -> Response:
    if isinstance(error.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body"
        return JSONResponse({"detail": "the body is not JSON: it is not valid UTF-8 text"}, 400)
    return await http_exception_handler(request, error)


async def client_gone(request: Request, error: ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; never delivered


async def crashed(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="r3", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="R3 (Regularized Relevance Reward) scoring for RL fine-tuning of LLMs.")
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()
    mount_docs(app)
    # Outermost last: Observe → ApiKeys → Draining → EarlyAdmission (body limit, one parse,
    # admission) → FastAPI's exception handling → routes.
    app.add_middleware(EarlyAdmission, state=app.state)
    app.add_middleware(Draining, state=app.state)
    if tenants := settings.all_tenants():
        app.add_middleware(ApiKeys, tenants={tenant.key: tenant.name for tenant in tenants})
    app.add_middleware(Observe, metrics=metrics)
    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientGone, client_gone)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, crashed)
    app.include_router(router)
    return app
