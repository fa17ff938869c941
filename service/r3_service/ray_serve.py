"""r3 on Ray Serve: the same FastAPI app, routes and responses as `r3-serve`, as one deployment
whose replicas each own an engine (model, scheduler, cache); Serve's proxy spreads requests over
them and restarts a replica that dies.

    serve run configs/serve.yaml            # or: serve deploy configs/serve.yaml on a running cluster

Settings come from `R3_CONFIG` / `R3_*` in each replica's environment (the config's
`runtime_env.env_vars`, or the cluster's). Query types and references live in Redis, which every
replica shares; without `R3_REDIS_URL` each replica keeps its own in-process store (warned).

`/metrics` answers for the whole deployment: the replica a scrape lands on asks every replica for
its registry (`DeploymentHandle.broadcast`) and returns their series side by side, each with a
`replica` label (sum over it in Prometheus). `/v1/info` says how many replicas serve.

Inside the cluster, `make_handle_reward_func` scores through a `DeploymentHandle` (no HTTP) with
the signature of the client's TRL reward functions.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import ray
from fastapi import FastAPI
from prometheus_client import generate_latest
from ray import serve
from ray.serve import Application

from r3_client.adapters import name_reward_func, trl_items
from r3_service.api.app import create_app
from r3_service.api.routes import raw_items
from r3_service.api.schemas import RewardRequest
from r3_service.engine.engine import RewardEngine
from r3_service.settings import Settings

log = logging.getLogger("r3_service")

APP_NAME = "r3"
DEPLOYMENT_NAME = "R3Replica"
BROADCAST_TRIES = 3
BROADCAST_PAUSE_S = 0.5
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?( .*)$")


def label_series(text: str, replica: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(header lines, sample lines) per metric family of one exposition, every sample labelled
    with `replica`."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    family = ""
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            family = line.split(" ", 3)[2]
            headers.setdefault(family, [])
            if line not in headers[family]:
                headers[family].append(line)
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, rest = match.groups()
        tag = f'replica="{replica}"'
        samples.setdefault(family, []).append(f"{name}{{{tag}{',' + labels if labels else ''}}}{rest}")
    return headers, samples


def merge_expositions(texts: dict[str, str]) -> str:
    """One Prometheus text exposition holding every replica's series (`replica` label added)."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in sorted(texts.items()):
        found_headers, found_samples = label_series(text, replica)
        for family, lines in found_headers.items():
            headers.setdefault(family, lines)
        for family, lines in found_samples.items():
            samples.setdefault(family, []).extend(lines)
    out = [line for family in headers for line in (*headers[family], *samples.get(family, []))]
    return "\n".join(out) + "\n"


class RayDeployment:
    """What `/metrics` and `/v1/info` report under Serve: every replica, not the one asked."""

    def __init__(self, local: Callable[[], str]) -> None:
        self.local = local  # this replica's own exposition
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.app_name = context.app_name
        self.deployment = context.deployment

    def _handle(self) -> Any:
        return serve.get_deployment_handle(self.deployment, app_name=self.app_name)

    async def _broadcast(self, method: str) -> list[Any]:
        """Every live replica's answer; a replica that dies during the call (a restart, a node
        leaving) fails it, so it is asked again, and in the end only this replica answers."""
        for _ in range(BROADCAST_TRIES):
            try:
                return await self._handle().broadcast(method).results_async()
            except Exception as error:  # a replica went away mid-call
                log.warning("broadcast of %s failed (%s); asking again", method, error)
                await asyncio.sleep(BROADCAST_PAUSE_S)
        return []

    async def describe(self) -> dict[str, object]:
        placement = dict(await self._broadcast("placement"))
        return {"kind": "ray-serve", "app": self.app_name, "deployment": self.deployment,
                "replicas": len(placement) or None, "replica": self.replica,
                "nodes": sorted(set(placement.values()))}

    async def exposition(self) -> bytes:
        texts = dict(await self._broadcast("metrics_text"))
        return merge_expositions(texts or {self.replica: self.local()}).encode()


def build_ingress() -> FastAPI:
    """The app of this replica, built in the replica (Serve calls this on each one)."""
    settings = Settings()
    if settings.redis_url is None:
        log.warning("r3 on Ray Serve without R3_REDIS_URL: each replica keeps its own in-process "
                    "query-type store, so replicas may type the same query differently; set R3_REDIS_URL")
    app = create_app(settings)
    app.state.deployment = RayDeployment(lambda: generate_latest(app.state.metrics.registry).decode())
    return app


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(build_ingress)
class R3Replica:
    """One engine per replica; the methods below answer `broadcast` calls of other replicas."""

    def replica_id(self) -> str:
        return serve.get_replica_context().replica_id.unique_id

    def placement(self) -> tuple[str, str]:
        """(replica, Ray node id) of this replica."""
        return self.replica_id(), ray.get_runtime_context().get_node_id()

    async def score(self, items: list[dict[str, Any]], backend: str | None = None) -> list[float]:
        """Rewards of `items` (the fields of `POST /reward` items), for callers inside the Ray
        cluster that hold a handle: validated like a request, scored by this replica's engine."""
        request = RewardRequest.model_validate({"items": items, "backend": backend})
        engine: RewardEngine = self.app.state.engine
        scored = await engine.score(raw_items(request), engine.backend(request.backend))
        return [item.reward for item in scored]

    def metrics_text(self) -> tuple[str, str]:
        return self.replica_id(), self.app.state.deployment.local()


def make_handle_reward_func(app_name: str = APP_NAME, *, backend: str | None = None,
                            reference_key: str | None = None,
                            query_type_key: str | None = None) -> Callable[..., list[float]]:
    """A TRL-style `reward_func(prompts, completions, **columns) -> list[float]`, as
    `r3_client.adapters.make_reward_func` builds, that scores through the deployment's handle
    instead of HTTP: for trainers already inside the Ray cluster (call it in a Ray driver, task
    or actor). Items are read from the arguments exactly as the HTTP adapter reads them."""
    handle = serve.get_app_handle(app_name)

    def reward_func(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        items = trl_items(prompts, completions, columns, reference_key=reference_key,
                          query_type_key=query_type_key)
        return handle.score.remote([asdict(item) for item in items], backend).result()

    name_reward_func(reward_func, backend)
    return reward_func


def build(args: dict[str, str] | None = None) -> Application:
    """The Serve application (`import_path: r3_service.ray_serve:build`); deployment options
    (replicas, autoscaling, ray_actor_options) come from the Serve config."""
    return R3Replica.bind()
