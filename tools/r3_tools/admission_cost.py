"""What admitting or refusing one scoring request costs, step by step, on the event loop: where
a refusal can be put and what it costs there. In this process, on the packaged model.

    python -m r3_tools.admission_cost [--items 64] [--out bench/results/admission-cost.json]

Steps: the C-level parse (orjson), the demand read from the parsed body (its shape, limits and
distinct texts), the tokens charged (words), the hold and the 429: a refusal; then the whole
refusal through the admission middleware and through the app's whole middleware stack (ASGI, no
socket). What an admitted body costs on top: validation of the parsed body with the route's model
and the route's preparation, once. For comparison: FastAPI's own body handling (`json.loads` and
validation), which each admitted body paid a second time before the middleware handed it over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from r3_service.api.app import create_app
from r3_service.api.early import reward_demand
from r3_service.api.middleware import EarlyAdmission, too_busy
from r3_service.api.routes import prepare_reward
from r3_service.api.schemas import RewardRequest
from r3_service.engine.admission import charge, demand
from r3_service.engine.engine import RewardEngine
from r3_service.engine.scheduler import BatchScheduler, QueueFull
from r3_service.settings import Settings
from r3_tools.loadgen import DATA, make_pairs

REPEATS = 300


def median_us(step: Callable[[], object], repeats: int = REPEATS) -> float:
    step()  # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


async def refusal_through(app: Callable, body: bytes) -> int:
    """One request through `app` (ASGI), as uvicorn hands it over; its status."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "path": "/reward", "method": "POST", "query_string": b"", "headers": headers}
    status = 0

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def measure(items: int) -> dict[str, object]:
    settings = Settings(max_queue_tokens=10_000, qtype_classifier="none")
    engine = RewardEngine.from_settings(settings)
    pairs = make_pairs(DATA, items, grouped=False)
    body = json.dumps({"items": [p.item() for p in pairs]}).encode()
    backend = engine.backend(None)
    document = orjson.loads(body)
    request = RewardRequest.model_validate(document)
    texts = demand(prepare_reward(request, engine, settings, {}).items)
    queue: BatchScheduler = engine.pool.schedulers[next(iter(engine.pool.schedulers))]
    hog = engine.admit({f"{i} " + "word " * 400 for i in range(200)}, backend)

    def refuse() -> None:
        try:
            engine.admit(texts, backend)
        except QueueFull as error:
            too_busy(error).render({"detail": str(error)})

    app = create_app(settings)
    app.state.engine = engine
    middleware = EarlyAdmission(lambda *_: None, app.state)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    for refuser in (middleware, app):
        assert loop.run_until_complete(refusal_through(refuser, body)) == 429

    steps = {
        "orjson parse": median_us(lambda: orjson.loads(body)),
        "demand from the parsed body (shape, limits, distinct texts)": median_us(
            lambda: reward_demand(document, settings)),
        "charge (words, tokens)": median_us(lambda: charge(texts, queue.model.info)),
        "refuse (hold fails, 429 rendered)": median_us(refuse),
        "whole refusal through the admission middleware (ASGI)": median_us(
            lambda: loop.run_until_complete(refusal_through(middleware, body))),
        "whole refusal through the app's middleware stack (ASGI)": median_us(
            lambda: loop.run_until_complete(refusal_through(app, body))),
        "admitted, once: validate the parsed body (pydantic, route's model)": median_us(
            lambda: RewardRequest.model_validate(document)),
        "admitted, once: prepare (limits, items, backend)": median_us(
            lambda: prepare_reward(request, engine, settings, {})),
        "for comparison: json.loads + validation (FastAPI's way, paid again before)": median_us(
            lambda: RewardRequest.model_validate(json.loads(body))),
    }
    hog.release()
    loop.close()
    return {"items": items, "body_bytes": len(body), "distinct_texts": len(texts),
            "charged_tokens": charge(texts, queue.model.info),
            "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
            "median_us": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r3_tools.admission_cost",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--items", type=int, default=64, help="items per request body")
    parser.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args(argv)
    result = measure(args.items)
    print(f"{args.items}-item body: {result['body_bytes']} bytes, {result['distinct_texts']} distinct texts, "
          f"{result['charged_tokens']} tokens charged")
    print("| step | median µs |\n|---|--:|")
    for step, micros in result["median_us"].items():  # type: ignore[union-attr]
        print(f"| {step} | {micros:.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
