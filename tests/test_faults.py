"""Faults under load, each against a real r3-serve and a real redis-server, driven by the load
generator's own code (`r3_tools.loadgen`): Redis killed and restarted, Redis answering slowly,
overload past the queue, and clients that disconnect mid-request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from test_store import metric, post_reward, run_loader

from conftest import DATA, RedisServer, ServiceProcess, free_port, start_service, wait_until
from r3_service.store.records import query_key
from r3_tools.loadgen import Pair, Run, Target, Workload, closed_loop, make_pairs, open_loop, parse_mix

pytestmark = pytest.mark.slow  # real servers, training or process faults throughout

FAULT_MIX = parse_mix("1:0.6,8:0.4")


def store_workload(count: int = 512) -> Workload:
    """Unlabelled AlpacaFarm items: every query is looked up in the store."""
    return Workload(FAULT_MIX, make_pairs(DATA, count, grouped=False), labels=False)


def assert_all_ok(run: Run) -> None:
    failed = [(o.status, o.error) for o in run.outcomes if not o.ok]
    assert run.outcomes and not failed, f"{len(failed)} of {len(run.outcomes)} failed: {failed[:5]}"


def stored_type_source(url: str, query: str) -> str:
    """Where the service found `query`'s type; the `li` preset needs no model, so this is quick."""
    body = {"items": [{"query": query, "response": "A short answer."}], "backend": "li",
            "return_components": True}
    return httpx.post(f"{url}/reward", json=body, timeout=30).json()["components"][0]["query_type_source"]


def test_redis_killed_and_restarted_under_load_fails_no_request(tmp_path: Path) -> None:
    """SIGKILL Redis during load and start it again: no request fails, the outage and the lookups
    it turned into misses are counted, and the store reconnects on its own."""
    own_redis = RedisServer(free_port(), tmp_path)
    own_redis.start()
    assert run_loader("load", str(DATA), "--redis-url", own_redis.url).returncode == 0
    # A queue bound far above this load: overload is a fault of its own, tested below.
    proc = start_service(tmp_path, R3_REDIS_URL=own_redis.url, R3_REDIS_RETRY_S="0.5",
                         R3_MAX_QUEUE_TOKENS="10000000")
    try:
        misses = metric(proc.url, 'r3_store_lookups_total{result="miss"}')

        async def scenario() -> Run:
            load = asyncio.ensure_future(closed_loop(Target(proc.url, timeout=60), store_workload(), 4, 10.0))
            await asyncio.sleep(3)
            assert own_redis.process is not None
            own_redis.process.kill()
            own_redis.process.wait(10)
            own_redis.process = None
            await asyncio.sleep(3)
            await asyncio.to_thread(own_redis.start)  # empty: it persisted nothing
            return await load

        assert_all_ok(asyncio.run(scenario()))
        assert metric(proc.url, "r3_store_errors_total") >= 1
        assert metric(proc.url, "r3_store_fallbacks_total") > 0
        assert metric(proc.url, 'r3_store_lookups_total{result="miss"}') > misses

        assert run_loader("load", str(DATA), "--redis-url", own_redis.url).returncode == 0
        unseen = json.loads(DATA.read_text())[-1]["input"]  # beyond the load's pool of queries
        wait_until(lambda: stored_type_source(proc.url, unseen) == "cache", 20, "store reconnection")
        assert httpx.get(f"{proc.url}/readyz", timeout=10).json()["store"]["status"] == "ok"
    finally:
        proc.stop()
        own_redis.stop()


class SlowProxy:
    """A TCP proxy on 127.0.0.1 in front of Redis that holds each of Redis's answers `delay` s."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.delay = 0.0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> SlowProxy:
        self._thread.start()
        assert self._started.wait(10), "proxy did not start"
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._started.set()
        self._loop.run_forever()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        with contextlib.suppress(asyncio.CancelledError):  # the proxy closing
            await asyncio.gather(self._pipe(client_r, redis_w, slow=False),
                                 self._pipe(redis_r, client_w, slow=True), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow: bool) -> None:
        try:
            while chunk := await reader.read(65536):
                if slow and self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()


def test_slow_redis_costs_each_request_a_bounded_wait(redis_server: RedisServer, tmp_path: Path) -> None:
    """Redis answers 5 s late for a while (a delaying proxy) under a light load: every request still
    succeeds in far less than the delay (R3_REDIS_TIMEOUT_MS bounds the lookup), resolved with the
    default type, and the store is used again once Redis is quick. Requests use the `li` preset
    (no model) so their time is the lookup's, not the shared CPU's; the bound asserted is loose
    (half the delay): a request that waited for Redis would take 5 s."""
    delay = 5.0
    with SlowProxy(redis_server.port) as proxy:
        proc = start_service(tmp_path, R3_REDIS_URL=proxy.url, R3_REDIS_TIMEOUT_MS="100",
                             R3_REDIS_RETRY_S="0.5", R3_QTYPE_CLASSIFIER="none")
        try:
            stored = "Slow-store test: which metal is liquid at room temperature?"
            redis.Redis.from_url(redis_server.url).hset(query_key(stored), mapping={"query_type": "closed"})
            workload = Workload(parse_mix("1:0.7,8:0.3"), make_pairs(DATA, 256, grouped=False), labels=False,
                                backend="li")

            async def scenario() -> tuple[Run, list[tuple[str, float]]]:
                load = asyncio.ensure_future(open_loop(Target(proc.url, timeout=30), workload, 10, 10.0))
                await asyncio.sleep(2)
                proxy.delay = delay
                probes = []
                for i in range(3):
                    await asyncio.sleep(1)
                    started = time.perf_counter()
                    source = await asyncio.to_thread(stored_type_source, proc.url, f"Slow-store probe {i}")
                    probes.append((source, time.perf_counter() - started))
                await asyncio.sleep(1)
                proxy.delay = 0.0
                return await load, probes

            run, probes = asyncio.run(scenario())
            assert_all_ok(run)
            slowest = max(o.latency for o in run.outcomes)
            assert slowest < delay / 2, f"a request waited {slowest:.2f} s on the slow store"
            assert all(source == "default" and seconds < delay / 2 for source, seconds in probes), probes
            assert metric(proc.url, "r3_store_errors_total") >= 1
            wait_until(lambda: stored_type_source(proc.url, stored) == "cache", 20, "store recovery")
        finally:
            proc.stop()


def long_pairs(count: int, tag: str) -> list[Pair]:
    return [Pair(f"{tag} question {i}?", f"{tag} answer {i}: " + "many words here " * 60, None, "open")
            for i in range(count)]


def queue_bound(url: str) -> int:
    return httpx.get(f"{url}/v1/info", timeout=10).json()["models"][0]["max_queue_tokens"]


def charged_tokens(pairs: list[Pair], max_length: int = 256) -> int:
    """What admission charges for these pairs on the packaged model: each distinct text's words
    plus its 2 special tokens, at most the model's length (an oracle of the documented rule)."""
    texts = {text for pair in pairs for text in (pair.query, pair.response)}
    return sum(min(max_length, 2 + len(text.split())) for text in texts)


@pytest.mark.parametrize("bound", ["4096", "measured"])
def test_overload_past_the_queue_is_refused_promptly_and_recovers(tmp_path: Path, bound: str) -> None:
    """Requests of 4 items (8 distinct texts) adding up to twice the queue bound, all within about
    0.2 s: the excess gets 429 with Retry-After at once, nothing times out, and the service then
    answers normally. Once with a bound set by hand, once with one measured at start-up (half a
    second of work, so that twice the bound is a burst of tens of requests on any device)."""
    settings = {"R3_MAX_QUEUE_TOKENS": bound} if bound.isdigit() else {"R3_QUEUE_SECONDS": "0.5"}
    proc = start_service(tmp_path, R3_MAX_BATCH_SIZE="8", R3_MAX_WAIT_MS="0", R3_EMBEDDING_CACHE_SIZE="0",
                         **settings)
    try:
        limit = queue_bound(proc.url)
        assert 512 <= limit <= 4096 * 64, f"measured bound {limit} tokens"
        per_request = charged_tokens(long_pairs(4, "burst"))
        overload(proc.url, requests=max(4, 2 * limit // per_request))
    finally:
        proc.stop()


def overload(url: str, requests: int) -> None:
    rejected_before = metric(url, "r3_queue_rejections_total")
    target = Target(url, timeout=120)
    burst = asyncio.run(open_loop(target, Workload.fixed(long_pairs(4 * requests, "burst"), 4),
                                  requests / 0.2, 0.2))
    statuses = [o.status for o in burst.outcomes]
    assert len(statuses) == requests and set(statuses) == {200, 429}, statuses
    refused = [o for o in burst.outcomes if o.status == 429]
    assert all(o.retry_after and int(o.retry_after) >= 1 for o in refused)
    # A sanity bound, not a speed target (benchmarks measure that): refusal does not wait for work.
    assert max(o.latency for o in refused) < 1.0
    assert metric(url, "r3_queue_rejections_total") - rejected_before == len(refused)
    wait_until(lambda: metric(url, "r3_queue_depth") == 0, 60, "an empty queue")
    after = asyncio.run(closed_loop(target, Workload.fixed(long_pairs(8, "after"), 2), 2, 2.0))
    assert_all_ok(after)


def test_clients_leaving_mid_request_under_load_leak_no_work(tmp_path: Path) -> None:
    """Four clients give up on 100-item requests after 0.5 s while others keep scoring: their queued
    texts are dropped (counted), the queue drains to empty and the other clients see no error."""
    service = start_service(tmp_path, R3_MAX_QUEUE_TOKENS="10000000", R3_EMBEDDING_CACHE_SIZE="0")
    try:
        leave_mid_request(service)
    finally:
        service.stop()


def leave_mid_request(service: ServiceProcess) -> None:
    dropped_before = metric(service.url, "r3_dropped_texts_total")
    doomed = Workload.fixed(long_pairs(400, "leaving"), 100)

    async def scenario() -> tuple[Run, Run]:
        steady = asyncio.ensure_future(closed_loop(Target(service.url, timeout=60), store_workload(), 2, 6.0))
        await asyncio.sleep(1)
        leaving = await open_loop(Target(service.url, timeout=0.5), doomed, 8.0, 0.5)
        return await steady, leaving

    steady, leaving = asyncio.run(scenario())
    assert [o.error for o in leaving.outcomes] == ["ReadTimeout"] * 4
    assert_all_ok(steady)
    wait_until(lambda: metric(service.url, "r3_queue_depth") == 0, 30, "an empty queue")
    assert metric(service.url, "r3_dropped_texts_total") > dropped_before
    assert post_reward(service.url, [{"query": "Still there?", "response": "Yes."}]).status_code == 200
