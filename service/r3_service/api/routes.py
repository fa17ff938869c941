"""The routes, on one APIRouter. Thin: the admission middleware has validated, limited, prepared
and admitted a scoring request (`SCORING`); its route hands the prepared items to the engine and
shapes the answer. The engine and metrics come as dependencies from the app's state."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from r3_service.api import slime
from r3_service.api.openrlhf import SampleError, to_raw_items
from r3_service.api.schemas import (
    Components,
    ErrorResponse,
    GetRewardRequest,
    GetRewardResponse,
    RewardRequest,
    RewardResponse,
    SlimeRequest,
    SlimeReward,
)
from r3_service.engine.backends import RewardBackend
from r3_service.engine.engine import RewardEngine, UnknownBackend
from r3_service.engine.resolve import RawItem
from r3_service.metrics import Metrics
from r3_service.rule.reward import Scored
from r3_service.settings import Settings

T = TypeVar("T")
ERRORS = {400: {"model": ErrorResponse, "description": "The body is not JSON: invalid JSON, not UTF-8, "
                                                       "or not sent as application/json"},
          401: {"model": ErrorResponse, "description": "Missing or invalid API key (when keys are set)"},
          413: {"model": ErrorResponse, "description": "Over a configured limit"},
          422: {"description": "Invalid input; the message names the field"},
          429: {"model": ErrorResponse, "description": "Queue full; retry after `Retry-After` seconds"}}


async def get_engine(request: Request) -> RewardEngine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise HTTPException(503, "the model is still loading")
    return engine


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


# Async on purpose: FastAPI runs a sync dependency on its thread pool, a hop per request.
EngineDep = Annotated[RewardEngine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


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


def check_limits(settings: Settings, count: int, texts: dict[str, str | None]) -> None:
    """413 naming the limit: items per request, then characters per text."""
    if count > settings.max_items:
        raise HTTPException(413, f"{count} items exceed the limit of {settings.max_items} items "
                                 "per request (R3_MAX_ITEMS)")
    for field, text in texts.items():
        if text is not None and len(text) > settings.max_text_chars:
            raise HTTPException(413, f"{field} has {len(text)} characters, over the limit of "
                                     f"{settings.max_text_chars} (R3_MAX_TEXT_CHARS)")


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
        query_type_confidence=scored.query_type_confidence,
        open_branch_weight=scored.open_branch_weight,
        unpaid=scored.unpaid,
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




@dataclass(frozen=True)
class Prepared:
    """A scoring request ready for the engine: its validated body, its items and the backend that
    scores them."""

    body: BaseModel
    items: list[RawItem]
    backend: RewardBackend


Preparer = Callable[[Any, RewardEngine, Settings, Mapping[str, str]], Prepared]


def prepare_reward(body: RewardRequest, engine: RewardEngine, settings: Settings,
                   params: Mapping[str, str]) -> Prepared:
    check_limits(settings, len(body.items), {
        f"items[{i}].{field}": getattr(item, field)
        for i, item in enumerate(body.items) for field in ("query", "response", "reference")
    })
    return Prepared(body, raw_items(body), backend_named(engine, body.backend))


def prepare_get_reward(body: GetRewardRequest, engine: RewardEngine, settings: Settings,
                       params: Mapping[str, str]) -> Prepared:
    texts: dict[str, str | None] = {f"query[{i}]": q for i, q in enumerate(body.query)}
    texts |= {f"prompts[{i}]": p for i, p in enumerate(body.prompts or [])}
    texts |= {f"labels[{i}]": label if isinstance(label, str) else label and label.reference
              for i, label in enumerate(body.labels or [])}
    check_limits(settings, len(body.query), texts)
    backend = backend_named(engine, body.backend)
    try:
        return Prepared(body, to_raw_items(body), backend)
    except SampleError as error:
        raise HTTPException(422, str(error)) from None


def prepare_slime(body: SlimeRequest, engine: RewardEngine, settings: Settings,
                  params: Mapping[str, str]) -> Prepared:
    try:
        slime.check_query_parameters(params.keys())
    except slime.SlimeError as error:
        raise HTTPException(422, str(error)) from None
    check_limits(settings, 1, slime.texts(body))
    return Prepared(body, [slime.to_raw_item(body)], backend_named(engine, params.get("backend")))


# Each scoring path: the model its body validates as, and how it becomes engine items; the
# admission middleware runs both, once, before the route.
SCORING: dict[str, tuple[type[BaseModel], Preparer]] = {
    "/reward": (RewardRequest, prepare_reward),
    "/get_reward": (GetRewardRequest, prepare_get_reward),
    "/slime": (SlimeRequest, prepare_slime),
}


class PreparedRequest(Request):
    """A request whose JSON is the body the admission middleware validated (FastAPI takes an
    instance of the route's model as it is), so a body is parsed and validated once."""

    async def json(self) -> Any:
        prepared: Prepared | None = self.scope.get("state", {}).get("prepared")
        return prepared.body if prepared is not None else await super().json()


class PreparedRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            return await handle(PreparedRequest(request.scope, request.receive))

        return handler


router = APIRouter(route_class=PreparedRoute)


async def score(request: Request, endpoint: str, engine: RewardEngine,
                metrics: Metrics) -> tuple[list[Scored], RewardBackend]:
    """Score the items the admission middleware prepared, under its admission; given up (499) if
    the client leaves first; counts the items."""
    prepared: Prepared = request.state.prepared
    scoring = engine.score(prepared.items, prepared.backend, request.state.admission)
    results = await unless_disconnected(request, scoring)
    metrics.items.labels(endpoint, prepared.backend.name).inc(len(prepared.items))
    return results, prepared.backend


def raw_items(request: RewardRequest) -> list[RawItem]:
    """The engine's items of a `/reward` request (also the Ray handle's path)."""
    return [RawItem(i.query, i.response, i.reference, i.query_type) for i in request.items]


def backend_named(engine: RewardEngine, name: str | None) -> RewardBackend:
    try:
        return engine.backend(name)
    except UnknownBackend as error:
        raise HTTPException(422, str(error)) from None


@router.post("/reward", response_model=RewardResponse, responses=ERRORS)
async def reward(body: RewardRequest, request: Request, engine: EngineDep,
                 metrics: MetricsDep) -> RewardResponse:
    """Score (query, response) items with R3; rewards come back in item order."""
    results, backend = await score(request, "/reward", engine, metrics)
    return RewardResponse(
        rewards=[r.reward for r in results], backend=backend.name,
        components=[components(r) for r in results] if body.return_components else None,
    )


@router.post("/get_reward", response_model=GetRewardResponse, responses=ERRORS)
async def get_reward(body: GetRewardRequest, request: Request, engine: EngineDep,
                     metrics: MetricsDep) -> GetRewardResponse:
    """OpenRLHF remote reward model: `--remote_rm_url http://HOST:PORT/get_reward`."""
    # `body`, as each route's, is its schema; the admission middleware prepared the items from it.
    results, backend = await score(request, "/get_reward", engine, metrics)
    rewards = [r.reward for r in results]
    return GetRewardResponse(rewards=rewards, scores=rewards,
                             extra_logs=extra_logs(results, backend.uses_relevance))


@router.post("/slime", response_model=float | SlimeReward, responses=ERRORS)
async def slime_reward(
    body: SlimeRequest, request: Request, engine: EngineDep, metrics: MetricsDep,
    backend: Annotated[str | None, Query(description="Backend name (GET /v1/info lists them); "
                                                     "default: the configured one.")] = None,
    with_components: Annotated[bool, Query(alias="components", description=(
        "Answer {reward, <components>} (slime: --reward-key reward) instead of a bare number."))] = False,
) -> float | SlimeReward:
    """slime's remote reward model: `--rm-type remote_rm --rm-url http://HOST:PORT/slime`; one
    sample per request, answered with its reward as a bare JSON number."""
    # `backend` is declared for the schema; prepare_slime reads it from the query string.
    [result], _ = await score(request, "/slime", engine, metrics)
    return slime.answer(result.reward, components(result) if with_components else None)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Model not loaded yet"}})
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the model is loaded; also says which store is in use and its health."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return JSONResponse({"ready": False, "detail": "the model is still loading"}, 503)
    loaded = {(m["model"], m["device"]): None for m in engine.models()}  # views of one model: once
    models = [{"model": model, "device": device} for model, device in loaded]
    return JSONResponse({"ready": True, "models": models, "store": engine.store.status()})


@router.get("/metrics", response_class=Response)
async def prometheus(request: Request, metrics: MetricsDep) -> Response:
    """Prometheus text format; under Ray Serve, every replica's series with a `replica` label."""
    deployment = getattr(request.app.state, "deployment", None)
    body = await deployment.exposition() if deployment is not None else generate_latest(metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


SINGLE_PROCESS = {"kind": "process", "replicas": 1}


@router.get("/v1/info")
async def info(request: Request, engine: EngineDep) -> dict[str, object]:
    """The scoring settings in force: every backend with its settings, the loaded models, and
    how many replicas serve (`deployment`)."""
    deployment = getattr(request.app.state, "deployment", None)
    serving = await deployment.describe() if deployment is not None else SINGLE_PROCESS
    return {**engine.info(), "models": engine.models(), "deployment": serving}
