"""Load generation shared by `r3-bench`, `r3-loadtest` and the fault tests.

Real AlpacaFarm pairs, request shapes (k-item batches, GRPO groups, OpenRLHF samples), open- and
closed-loop drivers that record every request's outcome, latency percentiles, /metrics scrapes,
and `r3-serve` started in its own process. Needs httpx only (no torch): it runs beside trainers.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx

from r3_service.rule.datasets import read_records
from r3_service.rule.templates import extract_query

GROUP = 8
DATA = Path(__file__).resolve().parents[2] / "data" / "alpacafarm_val.json"
UNFINISHED = "Unfinished"  # the error of a request still in flight at the hard stop
ERROR_PAUSE_S = 0.05  # a closed-loop user's pause after a connection error: no hot loop on a dead server


@dataclass(frozen=True)
class Pair:
    query: str
    response: str
    reference: str | None
    query_type: str | None

    @property
    def target(self) -> str:
        """The text R3 compares the response with."""
        return self.reference if self.query_type == "closed" and self.reference else self.query

    def item(self, labels: bool = True) -> dict[str, str | None]:
        """A /reward item; without labels the service resolves type and reference from its store."""
        if not labels:
            return {"query": self.query, "response": self.response}
        return {"query": self.query, "response": self.response, "reference": self.reference,
                "query_type": self.query_type}


def make_pairs(path: Path, count: int, grouped: bool, group: int = GROUP) -> list[Pair]:
    """`count` pairs; grouped: `group` responses (other rows' answers) per prompt, as GRPO samples.
    Every response is distinct, and so is every prompt without groups (a " (variant k)" suffix
    once the data runs out): only a group's shared prompt/reference may be deduplicated."""
    records, _ = read_records(path)
    rows = [(extract_query(q), r) for q, r in records if r.reference]
    pairs = []
    for index in range(count):
        prompt = index // group if grouped else index
        query, record = rows[prompt % len(rows)]
        if prompt >= len(rows):
            query += f" (variant {prompt // len(rows)})"
        response = rows[(len(rows) // 2 + index) % len(rows)][1].reference or ""
        if index >= len(rows):
            response += f" (variant {index // len(rows)})"
        pairs.append(Pair(query, response, record.reference, record.query_type))
    return pairs


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds of latencies given in seconds."""
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": ordered[-1] * 1000}


_REPLICA = re.compile(r'replica="[^"]*",?')


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """/metrics as {sample with labels: value}, summed over the replicas of a Ray Serve
    deployment (whose series carry a `replica` label)."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = _REPLICA.sub("", name).replace("{}", "")
            values[name] = values.get(name, 0.0) + float(value)
    return values


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(env: dict[str, str], port: int) -> subprocess.Popen:
    """`r3-serve` on 127.0.0.1:`port` in its own process, returned once /readyz answers 200."""
    process = subprocess.Popen(
        [sys.executable, "-m", "r3_service.cli", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("r3-serve did not become ready")


def start_bare_refuser() -> tuple[subprocess.Popen, str]:
    """The bare refuser (`r3_tools.bare_refuser`) on a free 127.0.0.1 port in its own process, and
    its URL, once it accepts connections."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "r3_tools.bare_refuser", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the bare refuser did not start")


# --- request shapes --------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """One kind of request: `size` distinct pairs, a GRPO group of `size`, or an OpenRLHF sample."""

    kind: Literal["items", "grpo", "openrlhf"]
    size: int = 1

    @property
    def path(self) -> str:
        return "/get_reward" if self.kind == "openrlhf" else "/reward"

    def __str__(self) -> str:
        return {"items": str(self.size), "grpo": f"grpo{self.size}", "openrlhf": "openrlhf"}[self.kind]


def parse_shape(token: str) -> Shape:
    """`8` (8 items), `grpo8` (one prompt, 8 responses), `openrlhf` (one /get_reward sample)."""
    token = token.strip().lower()
    if token == "openrlhf":
        return Shape("openrlhf")
    kind: Literal["items", "grpo"] = "grpo" if token.startswith("grpo") else "items"
    digits = token.removeprefix("grpo")
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"bad request shape {token!r}: expected N, grpoN or openrlhf")
    return Shape(kind, int(digits))


def parse_mix(spec: str) -> list[tuple[Shape, float]]:
    """`1:0.5,8:0.3,64:0.2` → weighted shapes; a shape without a weight counts 1."""
    mix = []
    for part in spec.split(","):
        token, _, weight = part.partition(":")
        value = float(weight) if weight else 1.0
        if value <= 0:
            raise ValueError(f"weight of {token!r} must be positive")
        mix.append((parse_shape(token), value))
    return mix


@dataclass(frozen=True)
class Request:
    path: str
    body: dict
    items: int


def openrlhf_body(pair: Pair) -> dict:
    """One OpenRLHF sample: a Vicuna-templated prompt + response, the label as an object."""
    prompt = f"USER: {pair.query} ASSISTANT:"
    return {"query": [f"{prompt} {pair.response}"], "prompts": [prompt],
            "labels": [{"reference": pair.reference, "query_type": pair.query_type}]}


@dataclass
class Workload:
    """Request bodies drawn from a weighted mix (seeded), walking a pool of pairs in order so a
    request rarely meets texts another one has in flight. GRPO shapes use grouped pools."""

    mix: list[tuple[Shape, float]]
    pairs: list[Pair]
    labels: bool = True
    backend: str | None = None  # a preset name sent with every request; None: the service's default
    seed: int = 0
    data: Path = DATA
    tag: str = ""  # appended to every query and response (a second job's distinct texts)
    _groups: dict[int, list[Pair]] = field(default_factory=dict)
    _cursor: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    @classmethod
    def fixed(cls, pairs: list[Pair], items: int) -> Workload:
        """Every request: the next `items` pairs (adjacent pairs of a grouped pool share a prompt)."""
        return cls([(Shape("items", items), 1.0)], pairs)

    def _take(self, pool: list[Pair], key: int, count: int) -> list[Pair]:
        start = self._cursor.get(key, 0)
        self._cursor[key] = start + count
        chosen = [pool[(start + i) % len(pool)] for i in range(count)]
        if self.tag:  # another job's texts: never the same as this one's
            chosen = [replace(p, query=f"{p.query} {self.tag}", response=f"{p.response} {self.tag}")
                      for p in chosen]
        return chosen

    def _group_pool(self, size: int) -> list[Pair]:
        if size not in self._groups:
            self._groups[size] = make_pairs(self.data, max(len(self.pairs), size), grouped=True, group=size)
        return self._groups[size]

    def next(self) -> Request:
        shapes, weights = zip(*self.mix, strict=True)
        shape = self._random.choices(shapes, weights)[0] if len(shapes) > 1 else shapes[0]
        if shape.kind == "openrlhf":
            body = openrlhf_body(self._take(self.pairs, 0, 1)[0])
        else:
            pool = self._group_pool(shape.size) if shape.kind == "grpo" else self.pairs
            chosen = self._take(pool, shape.size if shape.kind == "grpo" else 0, shape.size)
            body = {"items": [p.item(self.labels) for p in chosen]}
        if self.backend:
            body["backend"] = self.backend
        return Request(shape.path, body, shape.size)

    def mean_items(self) -> float:
        total = sum(w for _, w in self.mix)
        return sum(s.size * w for s, w in self.mix) / total


# --- drivers ---------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One request: `start` is seconds into the run (the scheduled time in open loop, so queueing
    in the client counts), `latency` seconds to the answer or the error."""

    start: float
    items: int
    latency: float = 0.0
    status: int | None = None
    error: str | None = None  # exception type when there was no HTTP answer
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def end(self) -> float:
        return self.start + self.latency


@dataclass
class Run:
    outcomes: list[Outcome]
    elapsed: float
    origin: float  # perf_counter() when the run began: Outcome.start counts from here

    @property
    def latencies(self) -> list[float]:
        return [o.latency for o in self.outcomes if o.ok]

    @property
    def errors(self) -> int:
        return sum(not o.ok for o in self.outcomes)

    @property
    def items_ok(self) -> int:
        return sum(o.items for o in self.outcomes if o.ok)


@dataclass
class Target:
    """Where the load goes and how each request is sent."""

    url: str
    timeout: float = 120.0
    headers: dict[str, str] = field(default_factory=dict)
    max_connections: int = 256

    def client(self, connections: int | None = None) -> httpx.AsyncClient:
        count = connections or self.max_connections
        return httpx.AsyncClient(base_url=self.url, timeout=self.timeout, headers=self.headers,
                                 limits=httpx.Limits(max_connections=count, max_keepalive_connections=count))


async def send(client: httpx.AsyncClient, request: Request, started: float, origin: float,
               sink: list[Outcome]) -> Outcome:
    """Post `request`, timing it from `started`; recorded first so a hard stop still counts it."""
    outcome = Outcome(started - origin, request.items)
    sink.append(outcome)
    try:
        response = await client.post(request.path, json=request.body)
        outcome.status = response.status_code
        outcome.retry_after = response.headers.get("retry-after")
    except httpx.HTTPError as error:
        outcome.error = type(error).__name__
    except asyncio.CancelledError:
        outcome.error = UNFINISHED
        raise
    finally:
        outcome.latency = time.perf_counter() - started
    return outcome


async def post_plain(url: str, path: str, body: bytes, *, headers: dict[str, str] | None = None,
                     declared: int | None = None, timeout: float = 120.0) -> tuple[int, dict[str, str]]:
    """(status, headers) of one POST on a connection of its own, as a plain HTTP/1.1 client sends
    it: no pool, so a burst of hundreds measures the server, not a client library (httpx's pool
    alone added ~2 s to 400 simultaneous requests here). `declared` sends that Content-Length with
    only `body`, then waits for the answer: a server that answers must not have read the rest."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = {"Host": f"{host}:{port}", "Content-Type": "application/json",
            "Content-Length": str(len(body) if declared is None else declared), **(headers or {})}
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        request = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
        writer.write(request.encode() + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    finally:
        writer.close()
    status_line, *lines = answer.decode("latin-1").split("\r\n")
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(status_line.split()[1]), {k.strip().lower(): v.strip() for k, v in fields.items()}


HISTORIES = ("tiny", "long", "mix", "hostile")


def history_bodies(kind: str, count: int) -> list[bytes]:
    """`/reward` bodies a service may have seen before the measured load: `tiny` (the one-item
    curl check anyone sends first), `long` (5,000-character answers), `mix` (both, alternating),
    `hostile` (a security check: malformed and hostile bodies, one a response of 5,000 zero-width
    spaces, cycled). Admission must not depend on any of them."""
    if kind not in HISTORIES:
        raise ValueError(f"unknown history {kind!r}; valid: {', '.join(HISTORIES)}")
    if kind == "hostile":
        return [HOSTILE_BODIES[i % len(HOSTILE_BODIES)] for i in range(count)]
    tiny = {"query": "What is 2+2?", "response": "Four."}
    long = {"query": "Describe the history of tea in detail.",
            "response": ("Tea spread from China. " * 220)[:5000]}
    shapes = {"tiny": [tiny], "long": [long], "mix": [tiny, long]}[kind]
    return [json.dumps({"items": [{**shape, "query": f"{shape['query']} #{index}"}]}).encode()
            for index, shape in ((i, shapes[i % len(shapes)]) for i in range(count))]


HOSTILE_BODIES = [b"{", b"[]", b'{"items": 3}', b'{"items": [{"query": 1, "response": "x"}]}',
                  b'{"items": [{"query": "q", "response": "r", "extra": 1}]}', b"\xff\xfe",
                  json.dumps({"items": [{"query": "q", "response": "\u200b" * 5000}]}).encode(),
                  json.dumps({"items": [{"query": "q" * 3, "response": "\ud800 lone"}]}).encode()]


async def send_history(url: str, bodies: list[bytes], headers: dict[str, str] | None = None,
                       at_once: int = 8) -> Counter[int]:
    """Send `bodies` to `/reward`, `at_once` at a time; their statuses, counted."""
    gate = asyncio.Semaphore(at_once)

    async def one(body: bytes) -> int:
        async with gate:
            return (await post_plain(url, "/reward", body, headers=headers))[0]

    return Counter(await asyncio.gather(*(one(body) for body in bodies)))


async def burst(target: Target, workload: Workload, count: int) -> Run:
    """`count` requests at once, each on its own connection, all timed from the same instant: a
    trainer's rollout batch arriving in one go. Bodies are encoded before the clock starts."""
    requests = [workload.next() for _ in range(count)]
    bodies = [json.dumps(r.body).encode() for r in requests]
    outcomes: list[Outcome] = []
    origin = time.perf_counter()

    async def one(request: Request, body: bytes) -> None:
        outcome = Outcome(0.0, request.items)
        outcomes.append(outcome)
        try:
            outcome.status, headers = await post_plain(target.url, request.path, body,
                                                       headers=target.headers, timeout=target.timeout)
            outcome.retry_after = headers.get("retry-after")
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
            outcome.error = type(error).__name__
        finally:
            outcome.latency = time.perf_counter() - origin

    await asyncio.gather(*(one(r, b) for r, b in zip(requests, bodies, strict=True)))
    return Run(outcomes, time.perf_counter() - origin, origin)


async def finish(tasks: list[asyncio.Future], hard_stop: float | None) -> None:
    """Wait for `tasks` until the `hard_stop` (perf_counter time; None: no limit), then cancel."""
    if not tasks:
        return
    timeout = None if hard_stop is None else max(0.0, hard_stop - time.perf_counter())
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def closed_loop(target: Target, workload: Workload, users: int, duration: float,
                      drain: float | None = None) -> Run:
    """`users` clients, each sending its next request as soon as the previous one returns, for
    `duration` s; requests still running `drain` s later are cut off (None: wait for them)."""
    outcomes: list[Outcome] = []
    origin = time.perf_counter()
    deadline = origin + duration
    async with target.client(users) as client:

        async def user() -> None:
            while time.perf_counter() < deadline:
                outcome = await send(client, workload.next(), time.perf_counter(), origin, outcomes)
                if outcome.error:
                    await asyncio.sleep(ERROR_PAUSE_S)

        await finish([asyncio.ensure_future(user()) for _ in range(users)],
                     None if drain is None else deadline + drain)
    return Run(outcomes, time.perf_counter() - origin, origin)


async def open_loop(target: Target, workload: Workload, rate: float, duration: float,
                    drain: float | None = None) -> Run:
    """Request i is due at i / `rate` s whatever the latency, and timed from then (no coordinated
    omission); arrivals stop at `duration`, stragglers are cut off `drain` s later."""
    outcomes: list[Outcome] = []
    tasks: list[asyncio.Future] = []
    origin = time.perf_counter()
    async with target.client() as client:
        for index in range(int(rate * duration)):
            due = origin + index / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.ensure_future(send(client, workload.next(), due, origin, outcomes)))
        await finish(tasks, None if drain is None else origin + duration + drain)
    return Run(outcomes, time.perf_counter() - origin, origin)
