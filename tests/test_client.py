"""Unit tests of r3_client against a small scripted HTTP server (no r3 service, no model). The waits
between attempts are recorded (`Sleeps`), not slept."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest import MonkeyPatch

import r3_client._core
from r3_client import (
    AsyncRewardClient,
    Components,
    R3ClientError,
    R3HTTPError,
    RetryPolicy,
    RewardClient,
    RewardItem,
    ScoredBatch,
    adapters,
)
from r3_client._core import Done, Request, Sleep, advance, parse_retry_after, to_item

# --------------------------------------------------------------------------- scripted server


@dataclass
class Reply:
    """One scripted answer; `body=None` on a 200 means "score like the echo backend"."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    raw: bytes | None = None


@dataclass
class Seen:
    method: str
    path: str
    headers: Message
    body: Any


def echo_reward(item: dict[str, Any]) -> float:
    """The scripted server's reward: the response length, so order mix-ups show."""
    return float(len(item["response"]))


def echo_components(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "length_incentive": len(item["response"]) / 100,
        "repetition_penalty": 1.0,
        "relevance": None,
        "relevance_target": None,
        "query_type": item.get("query_type") or "open",
        "query_type_source": "request" if "query_type" in item else "default",
        "reference_source": "request" if "reference" in item else None,
    }


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 that plays `script` replies first, then echoes."""

    def __init__(self, port: int = 0) -> None:
        self.script: deque[Reply] = deque()
        self.requests: list[Seen] = []
        self.delay: Callable[[Any], float] = lambda body: 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.handle(self)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that timed out leave broken pipes behind, on purpose

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, seen: Seen) -> Reply:
        if seen.path == "/reward":
            items = seen.body["items"]
            body: dict[str, Any] = {
                "rewards": [echo_reward(item) for item in items],
                "backend": seen.body.get("backend") or "echo",
            }
            if seen.body.get("return_components"):
                body["components"] = [echo_components(item) for item in items]
            return Reply(body=body)
        if seen.path == "/v1/info":
            return Reply(body={"backends": ["echo"], "default_backend": "echo"})
        if seen.path == "/readyz":
            return Reply(body={"status": "ready"})
        return Reply(404, {"detail": "Not Found"})

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        seen = Seen(handler.command, handler.path, handler.headers, json.loads(raw) if raw else None)
        with self._lock:
            self.requests.append(seen)
            reply = self.script.popleft() if self.script else Reply()
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if reply.status == 200 and reply.body is None and reply.raw is None:
                reply = Reply(body=self.answer(seen).body, delay=reply.delay)
            time.sleep(reply.delay or self.delay(seen.body))
            data = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
            handler.send_response(reply.status)
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        finally:
            with self._lock:
                self.in_flight -= 1

    def reward_requests(self) -> list[Seen]:
        return [seen for seen in self.requests if seen.path == "/reward"]


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    scripted = ScriptedServer()
    yield scripted
    scripted.close()


def free_port() -> int:
    """A port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FAST = {"backoff": 0.01, "max_backoff": 0.05}
Use = Callable[..., Any]


@dataclass
class Sleeps:
    """The waits the clients ask for between attempts, recorded instead of slept; `then(n)` runs
    after the n-th (what the world does meanwhile)."""

    asked: list[float] = field(default_factory=list)
    then: Callable[[int], None] = lambda count: None

    def sync(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.then(len(self.asked))

    async def async_(self, seconds: float) -> None:
        self.sync(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture(params=["sync", "async"])
def use(request: pytest.FixtureRequest, sleeps: Sleeps) -> Use:
    """`use(url, method, *args, client=dict(options), **kwargs)`: one call through a fresh client,
    the sync `RewardClient` or the `AsyncRewardClient` (every test using this runs with both),
    whose waits between attempts go to `sleeps`."""

    def call(url: str, method: str, *args: Any, client: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        options = client or {}
        if request.param == "sync":
            with RewardClient(url, sleep=sleeps.sync, **options) as sync_client:
                return getattr(sync_client, method)(*args, **kwargs)

        async def run() -> Any:
            async with AsyncRewardClient(url, sleep=sleeps.async_, **options) as async_client:
                return await getattr(async_client, method)(*args, **kwargs)

        return asyncio.run(run())

    return call


def assert_backoff(waits: list[float], backoff: float, max_backoff: float) -> None:
    """Exponential backoff with equal jitter: wait n is in [c/2, c], c = min(max, backoff * 2^(n-1))."""
    for retry, wait in enumerate(waits, start=1):
        ceiling = min(max_backoff, backoff * 2 ** (retry - 1))
        assert ceiling / 2 <= wait <= ceiling, (retry, wait, ceiling)


# --------------------------------------------------------------------------- scoring


def test_score_accepts_every_item_form_and_sends_the_contract(use: Use, server: ScriptedServer) -> None:
    items = [
        RewardItem("q1", "a", reference="ref", query_type="closed"),
        {"query": "q2", "response": "bb", "query_type": "oe", "extra column": 1},
        ("q3", "ccc"),
    ]
    assert use(server.url, "score", items, backend="li") == [1.0, 2.0, 3.0]
    (seen,) = server.requests
    assert (seen.method, seen.path) == ("POST", "/reward")
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers.get("Authorization") is None
    assert seen.body == {
        "items": [
            {"query": "q1", "response": "a", "reference": "ref", "query_type": "closed"},
            {"query": "q2", "response": "bb", "query_type": "oe"},
            {"query": "q3", "response": "ccc"},
        ],
        "backend": "li",
        "return_components": False,
    }


def test_chunks_are_sent_in_pieces_and_reassembled_in_order(use: Use, server: ScriptedServer) -> None:
    # Later chunks answer first, so an async client that appended in completion order would fail.
    server.delay = lambda body: 0.2 - 0.02 * len(body["items"][0]["response"])
    items = [(f"q{i}", "x" * i) for i in range(7)]
    assert use(server.url, "score", items, client={"chunk_size": 2}) == [float(i) for i in range(7)]
    sent = [[item["response"] for item in seen.body["items"]] for seen in server.reward_requests()]
    assert sorted(sent) == [["", "x"], ["xx", "xxx"], ["xxxx", "xxxxx"], ["xxxxxx"]]


def test_empty_items_make_no_request(use: Use, server: ScriptedServer) -> None:
    assert use(server.url, "score", []) == []
    assert use(server.url, "score", [], return_components=True) == ScoredBatch([], [], "")
    assert server.requests == []


def test_components_are_parsed(use: Use, server: ScriptedServer) -> None:
    items = [RewardItem("q", "four", reference="r", query_type="closed"), ("q", "xy")]
    batch = use(server.url, "score", items, return_components=True, client={"chunk_size": 1})
    assert isinstance(batch, ScoredBatch)
    assert batch.rewards == [4.0, 2.0]
    assert batch.backend == "echo"
    assert batch.components == [
        Components(0.04, 1.0, "closed", "request", None, None, "request"),
        Components(0.02, 1.0, "open", "default", None, None, None),
    ]
    assert all(seen.body["return_components"] is True for seen in server.requests)


def test_an_ensembles_member_rewards_are_kept() -> None:
    wire = {"length_incentive": 0.1, "repetition_penalty": 1.0, "relevance": 0.5, "relevance_target": "query",
            "query_type": "open", "query_type_source": "cache", "reference_source": None,
            "members": {"r3": 1.25, "oasst": -0.5}, "a_future_field": 1}
    assert Components.from_dict(wire).members == {"r3": 1.25, "oasst": -0.5}
    assert Components.from_dict({**wire, "members": None}).members is None


def test_api_key_is_sent_as_bearer_token(use: Use, server: ScriptedServer) -> None:
    use(server.url, "score", [("q", "r")], client={"api_key": "s3cret"})
    assert server.requests[0].headers["Authorization"] == "Bearer s3cret"


def test_invalid_items_fail_before_any_request(use: Use, server: ScriptedServer) -> None:
    for bad in ([("q", 3)], [{"query": "q"}], ["just a string"], [("q", "r", 5)]):
        with pytest.raises(TypeError, match="item 0"):
            use(server.url, "score", bad)
    assert server.requests == []


def test_wrong_reward_count_is_an_error_not_retried(use: Use, server: ScriptedServer) -> None:
    server.script.append(Reply(body={"rewards": [1.0], "backend": "echo"}))
    with pytest.raises(R3ClientError, match="sent 2 items, got 1 rewards"):
        use(server.url, "score", [("q", "a"), ("q", "b")])
    assert len(server.requests) == 1


# --------------------------------------------------------------------------- retries


def test_retry_after_is_honoured(use: Use, server: ScriptedServer, sleeps: Sleeps) -> None:
    server.script.append(Reply(429, {"detail": "overloaded"}, {"Retry-After": "7"}))
    assert use(server.url, "score", [("q", "abc")], client={"backoff": 0.01, "max_backoff": 30}) == [3.0]
    assert sleeps.asked == [7.0]  # the server's word, not the ~10 ms backoff
    assert len(server.requests) == 2


def test_retry_after_is_capped_by_max_backoff(use: Use, server: ScriptedServer, sleeps: Sleeps) -> None:
    server.script.append(Reply(429, {"detail": "overloaded"}, {"Retry-After": "120"}))
    assert use(server.url, "score", [("q", "abc")], client={"max_backoff": 2.5}) == [3.0]
    assert sleeps.asked == [2.5]
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(use: Use, server: ScriptedServer, sleeps: Sleeps,
                                        status: int) -> None:
    server.script.extend([Reply(status, {"detail": "not now"}), Reply(status, raw=b"<html>oops</html>")])
    assert use(server.url, "score", [("q", "ab")], client={"backoff": 0.5, "max_backoff": 20}) == [2.0]
    assert len(server.requests) == 3
    assert len(sleeps.asked) == 2
    assert_backoff(sleeps.asked, 0.5, 20)


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422, 501])
def test_other_errors_are_not_retried(use: Use, server: ScriptedServer, sleeps: Sleeps, status: int) -> None:
    server.script.append(Reply(status, {"detail": f"nope {status}"}, {"Retry-After": "1"}))
    with pytest.raises(R3HTTPError) as caught:
        use(server.url, "score", [("q", "ab")])
    assert caught.value.status == status
    assert caught.value.detail == f"nope {status}"
    assert f"HTTP {status}" in str(caught.value) and f"nope {status}" in str(caught.value)
    assert len(server.requests) == 1 and sleeps.asked == []


def test_gives_up_after_max_retries(use: Use, server: ScriptedServer, sleeps: Sleeps) -> None:
    server.script.extend(Reply(503, raw=b"starting up") for _ in range(10))
    with pytest.raises(R3HTTPError) as caught:
        use(server.url, "score", [("q", "ab")], client={"max_retries": 2})
    assert (caught.value.status, caught.value.detail, caught.value.attempts) == (503, "starting up", 3)
    assert "after 3 attempts" in str(caught.value)
    assert len(server.requests) == 3
    assert len(sleeps.asked) == 2  # between attempts, none after the last


def test_connection_refused_is_retried_then_raised(use: Use, sleeps: Sleeps) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(R3ClientError) as caught:
        use(url, "score", [("q", "ab")], client={"max_retries": 2, "backoff": 1.0, "max_backoff": 1.5})
    assert not isinstance(caught.value, R3HTTPError)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert "after 3 attempts" in str(caught.value) and url in str(caught.value)
    assert len(sleeps.asked) == 2
    assert_backoff(sleeps.asked, 1.0, 1.5)


def test_connection_refused_until_the_server_comes_up(use: Use, sleeps: Sleeps) -> None:
    port = free_port()
    started: list[ScriptedServer] = []
    sleeps.then = lambda count: started.append(ScriptedServer(port)) if count == 3 else None
    try:
        options = {"max_retries": 20, "backoff": 0.5, "max_backoff": 4.0}
        assert use(f"http://127.0.0.1:{port}", "score", [("q", "ab")], client=options) == [2.0]
    finally:
        for up in started:
            up.close()
    assert len(sleeps.asked) == 3  # refused three times, answered on the fourth attempt
    assert_backoff(sleeps.asked, 0.5, 4.0)
    assert len(started[0].requests) == 1


def test_timeouts_are_retried(use: Use, server: ScriptedServer, sleeps: Sleeps) -> None:
    server.script.append(Reply(delay=1.0))
    assert use(server.url, "score", [("q", "ab")], client={"timeout": 0.3}) == [2.0]
    assert len(server.requests) == 2 and len(sleeps.asked) == 1


async def test_by_default_the_waits_are_slept(server: ScriptedServer) -> None:
    """The one test that waits for real: the clients' default sleeps are the clock's."""
    server.script.extend(Reply(503, headers={"Retry-After": "0.15"}) for _ in range(2))
    start = time.monotonic()
    with RewardClient(server.url) as sync_client:
        assert sync_client.score([("q", "ab")]) == [2.0]
    async with AsyncRewardClient(server.url) as async_client:
        assert await async_client.score([("q", "abc")]) == [3.0]
    assert time.monotonic() - start >= 0.3 and len(server.requests) == 4


def test_the_retry_flow_asks_for_each_wait_and_gives_up() -> None:
    """The sans-IO flow itself, stepped by hand: each answer in, the next step out."""
    with RewardClient("http://r3.invalid", max_retries=4, backoff=0.5, max_backoff=1.5) as client:
        flow = client._info_flow()
    answers: list[Any] = [httpx.Response(503, content=b"busy"), httpx.ConnectError("refused"),
                          httpx.Response(429, headers={"Retry-After": "1.25"}), httpx.ReadTimeout("slow")]
    waits = []
    step = advance(flow, None)
    for answer in answers:
        assert step == Request("GET", "http://r3.invalid/v1/info", step.headers, None)
        step = advance(flow, answer)
        assert isinstance(step, Sleep)
        waits.append(step.seconds)
        step = advance(flow, None)
    assert waits[2] == 1.25  # Retry-After
    assert_backoff([waits[0], waits[1]], 0.5, 1.5)
    assert 1.5 / 2 <= waits[3] <= 1.5  # the fourth retry's ceiling, capped
    with pytest.raises(R3HTTPError) as caught:
        advance(flow, httpx.Response(502, json={"detail": "down"}))
    assert (caught.value.status, caught.value.detail, caught.value.attempts) == (502, "down", 5)


def test_the_retry_flow_ends_with_the_parsed_answer_or_a_final_error() -> None:
    with RewardClient("http://r3.invalid") as client:
        flow = client._info_flow()
        advance(flow, None)
        assert isinstance(advance(flow, httpx.Response(500)), Sleep)
        advance(flow, None)
        assert advance(flow, httpx.Response(200, json={"backends": {}})) == Done({"backends": {}})
        flow = client._info_flow()
        advance(flow, None)
        with pytest.raises(R3ClientError, match="UnsupportedProtocol") as caught:
            advance(flow, httpx.UnsupportedProtocol("ftp://"))  # not worth another attempt
        assert "after 1 attempt:" in str(caught.value)


# --------------------------------------------------------------------------- info / ready / pools


def test_info_and_ready(use: Use, server: ScriptedServer) -> None:
    assert use(server.url, "info") == {"backends": ["echo"], "default_backend": "echo"}
    assert use(server.url, "ready") is True
    server.script.append(Reply(503, {"detail": "loading"}))
    assert use(server.url, "ready") is False
    assert [seen.path for seen in server.requests] == ["/v1/info", "/readyz", "/readyz"]
    assert use(f"http://127.0.0.1:{free_port()}", "ready") is False


def test_sync_client_reuses_a_callers_pool_and_leaves_it_open(server: ScriptedServer) -> None:
    with httpx.Client() as http:
        with RewardClient(server.url + "/", http_client=http, **FAST) as client:
            assert client.score([("q", "abc")]) == [3.0]
        assert not http.is_closed
        assert http.get(server.url + "/readyz").status_code == 200


async def test_async_client_reuses_a_callers_pool_and_leaves_it_open(server: ScriptedServer) -> None:
    async with httpx.AsyncClient() as http:
        async with AsyncRewardClient(server.url, http_client=http, **FAST) as client:
            assert await client.score([("q", "abc")]) == [3.0]
        assert not http.is_closed


async def test_async_chunks_run_concurrently_within_the_bound(server: ScriptedServer) -> None:
    server.delay = lambda body: 0.2
    items = [("q", "x" * i) for i in range(9)]
    async with AsyncRewardClient(server.url, chunk_size=1, max_concurrency=3, **FAST) as client:
        start = time.monotonic()
        assert await client.score(items) == [float(i) for i in range(9)]
        elapsed = time.monotonic() - start
    assert server.max_in_flight == 3
    assert elapsed < 9 * 0.2 * 0.75  # sequential would take 1.8 s; 3 at a time takes ~0.6 s


def test_sync_chunks_go_one_at_a_time(server: ScriptedServer) -> None:
    server.delay = lambda body: 0.05
    with RewardClient(server.url, chunk_size=1, **FAST) as client:
        assert client.score([("q", "x" * i) for i in range(4)]) == [0.0, 1.0, 2.0, 3.0]
    assert server.max_in_flight == 1


async def test_async_failure_of_one_chunk_cancels_the_rest(server: ScriptedServer) -> None:
    server.script.append(Reply(422, {"detail": "bad chunk"}))
    server.delay = lambda body: 0.1
    async with AsyncRewardClient(server.url, chunk_size=1, max_concurrency=1, **FAST) as client:
        with pytest.raises(R3HTTPError, match="bad chunk"):
            await client.score([("q", "a")] * 20)
    await asyncio.sleep(0.3)
    assert len(server.requests) < 20


# --------------------------------------------------------------------------- core pieces


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(max_retries=10, backoff=0.5, max_backoff=3.0)
    for retry, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        delays = {policy.delay(retry) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered
    assert policy.delay(1, retry_after=2.5) == 2.5
    assert policy.delay(1, retry_after=60) == 3.0
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    for junk in (None, "", "soon", "nan"):
        assert parse_retry_after(junk) is None


def test_to_item_forms() -> None:
    assert to_item(("q", "r")) == RewardItem("q", "r")
    assert to_item(["q", "r", "ref", "closed"]) == RewardItem("q", "r", "ref", "closed")
    assert to_item({"query": "q", "response": "r", "reference": None}) == RewardItem("q", "r")
    with pytest.raises(TypeError, match="item 4: reference"):
        to_item({"query": "q", "response": "r", "reference": 3}, 4)


def test_client_options_are_validated() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        RewardClient(chunk_size=0)
    with pytest.raises(ValueError, match="max_concurrency"):
        AsyncRewardClient(max_concurrency=0)


# --------------------------------------------------------------------------- TRL adapter


CHAT_PROMPT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a  primary\ncolour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " And another?"}]},
]
CHAT_COMPLETION = [{"role": "assistant", "content": "Blue\n\nis one."}]


def test_message_lists_become_query_and_response_text() -> None:
    assert adapters.query_text(CHAT_PROMPT) == "Name a primary colour. And another?"
    assert adapters.response_text(CHAT_COMPLETION) == "Blue\n\nis one."
    two_turns = [{"role": "assistant", "content": "One."}, {"role": "tool", "content": "x"}]
    assert adapters.response_text([*two_turns, {"role": "assistant", "content": "Two."}]) == "One. Two."
    assert adapters.query_text("  raw prompt\n") == "  raw prompt\n"
    assert adapters.query_text([{"role": "system", "content": "only  system"}]) == "only system"
    assert adapters.query_text(None) == adapters.response_text(42) == ""


def test_trl_items_take_columns_and_ignore_junk() -> None:
    columns = {
        "reference": [None, "", "ref-2"],
        "solution": ["sol-0", "sol-1", "sol-2"],
        "qtype": ["closed", 7, None],
        "trainer_state": object(),
        "completion_ids": [[1, 2], [3], [4]],
        "answer": ["too", "short"],  # wrong length: not per-sample
        "scores": [0.1, 0.2, 0.3],
    }
    items = adapters.trl_items(["p0", "p1", "p2"], ["c0", "c1", "c2"], columns)
    assert items == [
        RewardItem("p0", "c0", "sol-0", "closed"),
        RewardItem("p1", "c1", "sol-1", None),
        RewardItem("p2", "c2", "ref-2", None),
    ]
    chosen = adapters.trl_items(
        ["p"],
        ["c"],
        {"gold": ["g"], "reference": ["r"], "kind": ["open"]},
        reference_key="gold",
        query_type_key="kind",
    )
    assert chosen == [RewardItem("p", "c", "g", "open")]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        adapters.trl_items(["a", "b"], ["c"], {})


def test_trl_reward_func_scores_through_the_service(server: ScriptedServer) -> None:
    reward_func = adapters.make_reward_func(server.url, **FAST)
    assert reward_func.__name__ == "r3"
    rewards = reward_func(
        prompts=[CHAT_PROMPT, "plain"],
        completions=[CHAT_COMPLETION, "abc"],
        ground_truth=["gt", None],
        trainer_state=object(),
        completion_ids=[[1], [2]],
    )
    assert rewards == [float(len("Blue\n\nis one.")), 3.0]
    assert server.requests[0].body["items"] == [
        {"query": "Name a primary colour. And another?", "response": "Blue\n\nis one.", "reference": "gt"},
        {"query": "plain", "response": "abc"},
    ]
    assert server.requests[0].body["backend"] is None
    assert adapters.make_reward_func(server.url, backend="li-rp").__name__ == "r3_li-rp"


async def test_async_trl_reward_func(server: ScriptedServer) -> None:
    reward_func = adapters.make_async_reward_func(server.url, backend="li", chunk_size=1, **FAST)
    assert reward_func.__name__ == "r3_li"
    assert asyncio.iscoroutinefunction(reward_func)
    rewards = await reward_func(["p", "p"], ["a", "bb"], output=["o", "o"], qtype=["oe", "ce"], x=1)
    assert rewards == [1.0, 2.0]
    sent = sorted((item for seen in server.requests for item in seen.body["items"]), key=str)
    assert sent == [
        {"query": "p", "response": "a", "reference": "o", "query_type": "oe"},
        {"query": "p", "response": "bb", "reference": "o", "query_type": "ce"},
    ]
    assert {seen.body["backend"] for seen in server.requests} == {"li"}


# --------------------------------------------------------------------------- verl adapter


def test_verl_compute_score(server: ScriptedServer, monkeypatch: MonkeyPatch) -> None:
    monkeypatch.setenv("R3_URL", server.url)
    monkeypatch.setenv("R3_BACKEND", "r3-no-branch")
    score = adapters.compute_score(
        "alpaca",
        "four!",
        {"reference": "4", "query_type": "closed"},
        extra_info={"index": 3, "question": "What is 2+2?", "qtype": "open"},
        extra_kwarg=1,
    )
    assert score == 5.0
    assert server.requests[0].body == {
        "items": [{"query": "What is 2+2?", "response": "four!", "reference": "4", "query_type": "closed"}],
        "backend": "r3-no-branch",
        "return_components": False,
    }


def test_verl_compute_score_batch(server: ScriptedServer, monkeypatch: MonkeyPatch) -> None:
    monkeypatch.setenv("R3_URL", server.url)
    monkeypatch.delenv("R3_BACKEND", raising=False)
    scores = adapters.compute_score_batch(
        ["a", "b", "c"],
        ["x", "yy", "zzz"],
        ["ref", None, 42],
        [{"prompt": [{"role": "user", "content": "Hi  there"}], "qtype": "CONSTRAINED"},
         {"question": "Why?"}, {"query": 1, "prompt": "Who?"}],
    )
    assert scores == [1.0, 2.0, 3.0]
    assert server.requests[0].body["items"] == [
        {"query": "Hi there", "response": "x", "reference": "ref", "query_type": "CONSTRAINED"},
        {"query": "Why?", "response": "yy"},
        {"query": "Who?", "response": "zzz"},
    ]
    assert server.requests[0].body["backend"] is None


@pytest.mark.parametrize("extra_info", [None, {}, {"index": 3}, {"query": 1}, {"prompt": "  "},
                                        {"prompt": [{"role": "user", "content": ""}]}])
def test_verl_refuses_a_sample_with_no_query(server: ScriptedServer, monkeypatch: MonkeyPatch,
                                             extra_info: object) -> None:
    """Scoring against an empty query gives a wrong reward that looks right (0.003 for a 4.9 answer)."""
    monkeypatch.setenv("R3_URL", server.url)
    with pytest.raises(adapters.MissingQuery, match="extra_info needs one of query, question, prompt"):
        adapters.compute_score("alpaca", "Paris.", "Paris is the capital.", extra_info=extra_info)
    with pytest.raises(adapters.MissingQuery, match="extra_info keys"):
        adapters.compute_score_batch(["a", "b"], ["x", "y"], [None, None], [{"query": "Hi"}, extra_info])
    assert server.requests == []  # refused before any request


@pytest.mark.parametrize("prompts", [["", "fine"], ["fine", [{"role": "user", "content": "  "}]], ["ok", 3]])
def test_trl_refuses_a_prompt_with_no_query(prompts: list, server: ScriptedServer) -> None:
    reward_func = adapters.make_reward_func(server.url)
    with pytest.raises(adapters.MissingQuery, match=r"prompts\[1\]|prompts\[0\]"):
        reward_func(prompts=prompts, completions=["a", "b"])
    assert server.requests == []


def test_verl_client_is_one_per_process_and_url(server: ScriptedServer, monkeypatch: MonkeyPatch) -> None:
    monkeypatch.setenv("R3_URL", server.url)
    first, _ = adapters._verl_client()
    assert adapters._verl_client()[0] is first
    monkeypatch.setenv("R3_URL", server.url + "/")
    assert adapters._verl_client()[0] is not first
    if hasattr(os, "fork"):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: a fresh client, not the parent's pool
            os.write(write, b"1" if adapters._verl_client()[0] is not first else b"0")
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 1) == b"1"


# --------------------------------------------------------------------------- light install


def test_client_needs_no_heavy_dependencies() -> None:
    """Trainer environments install r3-client without torch & co.: importing must not need them."""
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        BLOCKED = {"torch", "transformers", "numpy", "pydantic", "fastapi", "sentence_transformers"}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        for name in BLOCKED:
            sys.modules.pop(name, None)
        try:
            import numpy
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not work")
        import r3_client, r3_client.adapters
        r3_client.RewardClient("http://127.0.0.1:1").close()
        r3_client.AsyncRewardClient("http://127.0.0.1:1")
        r3_client.adapters.make_reward_func("http://127.0.0.1:1")
        r3_client.adapters.make_async_reward_func("http://127.0.0.1:1")
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not heavy, heavy
        print("ok")
        """
    )
    package_root = Path(r3_client._core.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_rewards_are_floats(use: Use, server: ScriptedServer) -> None:
    server.script.append(Reply(body={"rewards": [1, 2.5], "backend": "echo"}))
    rewards = use(server.url, "score", [("q", "a"), ("q", "b")])
    assert rewards == [1.0, 2.5] and all(isinstance(r, float) and math.isfinite(r) for r in rewards)
