"""The batching engine: order, token budget, dedup, cache, OOM split, backpressure, disconnects."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import torch

from conftest import ServiceProcess, start_service
from r3_service.engine.queueing import BatchLimits, Entry, FairQueue
from r3_service.engine.scheduler import BatchScheduler, QueueFull
from r3_service.metrics import Metrics
from r3_tools.loadgen import post_plain


class RecordingModel:
    """The real model, with every forward's batch recorded and optional injected CUDA OOMs."""

    def __init__(self, model, oom_above: int | None = None, delay_s: float = 0.0) -> None:
        self.model = model
        self.info = model.info
        self.batches: list[list[int]] = []  # lengths of the sequences of each forward
        self.oom_above = oom_above
        self.delay_s = delay_s

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.model.tokenize(texts)

    def forward(self, sequences: list[list[int]]) -> torch.Tensor:
        if self.oom_above is not None and len(sequences) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        self.batches.append([len(s) for s in sequences])
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.model.forward(sequences)


def texts_of_varied_length(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    return [f"text {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 120)))
            for i in range(count)]


@asynccontextmanager
async def running(model, limits: BatchLimits, cache_size: int = 0) -> AsyncIterator[BatchScheduler]:
    scheduler = BatchScheduler(model, limits, Metrics(), cache_size=cache_size)
    scheduler.start()
    try:
        yield scheduler
    finally:
        await scheduler.close()


async def run_scheduler(model, limits: BatchLimits, requests: list[list[str]], *,
                        cacheable: bool = False, cache_size: int = 0) -> tuple[list[torch.Tensor], Metrics]:
    async with running(model, limits, cache_size) as scheduler:
        results = await asyncio.gather(*(scheduler.run(texts, [cacheable] * len(texts))
                                         for texts in requests))
    return results, scheduler.metrics


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


LIMITS = BatchLimits(max_tokens=600, max_size=16, max_wait_s=0.005, max_queue_tokens=10_000)


async def test_concurrent_requests_get_their_own_embeddings_in_order(embedding_model) -> None:
    texts = texts_of_varied_length(60)
    requests = [texts[i : i + 7] for i in range(0, 60, 7)]
    model = RecordingModel(embedding_model)
    results, metrics = await run_scheduler(model, LIMITS, requests)
    expected = embedding_model.embed(texts)
    got = torch.cat(results)
    assert torch.allclose(got, expected, atol=1e-5)
    # Batches were formed across requests: fewer forwards than requests, many sequences each.
    assert len(model.batches) < len(requests) * 2 and max(len(b) for b in model.batches) > 7
    assert counter(metrics, "r3_batch_size_count") == len(model.batches)


async def test_batches_respect_the_token_budget_longest_first(embedding_model) -> None:
    model = RecordingModel(embedding_model)
    await run_scheduler(model, LIMITS, [texts_of_varied_length(80, seed=1)])
    for lengths in model.batches:
        assert lengths == sorted(lengths, reverse=True)  # longest first: padded to the first
        assert len(lengths) <= LIMITS.max_size
        assert len(lengths) == 1 or lengths[0] * len(lengths) <= LIMITS.max_tokens
    # Length-sorted batching keeps padding small overall.
    real = sum(sum(b) for b in model.batches)
    padded = sum(b[0] * len(b) for b in model.batches)
    assert padded < 1.3 * real


async def test_the_oldest_text_is_served_first_however_short(embedding_model) -> None:
    """Length bucketing must not starve a short text behind a stream of long ones."""
    model = RecordingModel(embedding_model, delay_s=0.05)
    limits = BatchLimits(max_tokens=600, max_size=4, max_wait_s=0.0, max_queue_tokens=10_000)
    long_texts = [f"long text number {i} " + "word " * 100 for i in range(24)]
    async with running(model, limits) as scheduler:
        first = asyncio.ensure_future(scheduler.run(long_texts[:8], [False] * 8))
        await asyncio.sleep(0.02)
        short = asyncio.ensure_future(scheduler.run(["short"], [False]))
        await asyncio.sleep(0.02)
        later = asyncio.ensure_future(scheduler.run(long_texts[8:], [False] * 16))
        await asyncio.gather(first, short, later)
    short_batch = next(i for i, lengths in enumerate(model.batches) if min(lengths) < 10)
    assert sum(len(b) for b in model.batches[:short_batch]) <= 8  # only the earlier long texts


async def test_shared_texts_are_embedded_once_across_requests(embedding_model) -> None:
    prompt = "Explain why the sky is blue in two sentences."
    responses = [f"Response {i}: Rayleigh scattering makes short wavelengths scatter." for i in range(8)]
    requests = [[prompt, response] for response in responses]  # a GRPO group, one request each
    model = RecordingModel(embedding_model, delay_s=0.05)
    results, metrics = await run_scheduler(model, LIMITS, requests)
    assert sum(len(b) for b in model.batches) == 9  # 1 prompt + 8 responses, not 16
    assert counter(metrics, "r3_dedup_hits_total") == 7
    expected = embedding_model.embed([prompt, *responses])
    for i, result in enumerate(results):
        assert torch.allclose(result[0], expected[0], atol=1e-5)
        assert torch.allclose(result[1], expected[i + 1], atol=1e-5)


async def test_query_embeddings_come_from_the_cache_the_second_time(embedding_model) -> None:
    model = RecordingModel(embedding_model)
    async with running(model, LIMITS, cache_size=100) as scheduler:
        first = await scheduler.run(["a cached query", "response one"], [True, False])
        second = await scheduler.run(["a cached query", "response two"], [True, False])
        third = await scheduler.run(["response one"], [False])  # responses are not cached
    metrics = scheduler.metrics
    assert torch.equal(first[0], second[0])
    assert sum(len(b) for b in model.batches) == 4
    assert counter(metrics, "r3_embedding_cache_total", result="hit") == 1
    assert counter(metrics, "r3_embedding_cache_total", result="miss") == 1
    assert torch.allclose(third[0], first[1], atol=1e-5)


async def test_out_of_memory_splits_the_batch_and_no_request_fails(embedding_model) -> None:
    texts = texts_of_varied_length(40, seed=2)
    model = RecordingModel(embedding_model, oom_above=3)
    results, metrics = await run_scheduler(model, LIMITS, [texts[:20], texts[20:]])
    assert torch.allclose(torch.cat(results), embedding_model.embed(texts), atol=1e-5)
    assert all(len(b) <= 3 for b in model.batches)
    assert counter(metrics, "r3_oom_splits_total") > 0


async def test_full_queue_refuses_at_once_and_recovers(embedding_model) -> None:
    model = RecordingModel(embedding_model, delay_s=0.2)
    limits = BatchLimits(max_tokens=600, max_size=4, max_wait_s=0.0, max_queue_tokens=10)
    async with running(model, limits) as scheduler:

        async def request(texts: list[str]) -> torch.Tensor:
            scheduler.hold(len(texts))
            try:
                return await scheduler.run(texts, [False] * len(texts))
            finally:
                scheduler.release(len(texts))

        big = asyncio.ensure_future(request(texts_of_varied_length(30)))  # over the bound, but
        await asyncio.sleep(0.05)  # admitted: nothing was held
        with pytest.raises(QueueFull) as refused:
            scheduler.hold(1)
        assert refused.value.retry_after_s >= 1 and "R3_MAX_QUEUE_TOKENS" in str(refused.value)
        assert (await big).shape == (30, embedding_model.info.dim)
        assert (await request(["one more text"])).shape[0] == 1  # recovered: the hold was released
        scheduler.hold(6)
        scheduler.hold(4)  # up to the bound fits
        with pytest.raises(QueueFull):
            scheduler.hold(1)
    assert counter(scheduler.metrics, "r3_queue_rejections_total") == 2


async def test_cancelled_request_drops_its_queued_work_but_not_shared_work(embedding_model) -> None:
    model = RecordingModel(embedding_model, delay_s=0.1)
    limits = BatchLimits(max_tokens=10_000, max_size=2, max_wait_s=0.0, max_queue_tokens=1000)
    async with running(model, limits) as scheduler:
        texts = texts_of_varied_length(20, seed=3)
        doomed = asyncio.ensure_future(scheduler.run(texts, [False] * 20))
        shared = asyncio.ensure_future(scheduler.run([texts[-1]], [False]))  # shares one text
        await asyncio.sleep(0.15)
        doomed.cancel()
        assert (await shared).shape[0] == 1  # the shared text was still computed
        await asyncio.sleep(0.3)
        assert scheduler.queued == 0
    computed = sum(len(b) for b in model.batches)
    assert computed < 20 and counter(scheduler.metrics, "r3_dropped_texts_total") == 20 - computed


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service with a small queue (16 items of `long_items`, ~210 tokens each) and small
    batches, to overload on purpose."""
    proc = start_service(tmp_path_factory.mktemp("tight"), R3_MAX_QUEUE_TOKENS="3400",
                         R3_MAX_BATCH_SIZE="8", R3_MAX_WAIT_MS="0")
    yield proc
    proc.stop()


def long_items(count: int, tag: str) -> list[dict]:
    return [{"query": f"{tag} question {i}", "response": f"{tag} answer {i} " + "word " * 200}
            for i in range(count)]


async def test_http_429_with_retry_after_while_a_big_request_runs(tight: ServiceProcess) -> None:
    async with httpx.AsyncClient(base_url=tight.url, timeout=120) as client:
        big = asyncio.ensure_future(client.post("/reward", json={"items": long_items(150, "big")}))
        await asyncio.sleep(0.5)
        small = await client.post("/reward", json={"items": long_items(1, "small")})
        assert not big.done()  # the refusal came while the big request was still running
        assert small.status_code == 429
        assert int(small.headers["Retry-After"]) >= 1 and "R3_MAX_QUEUE_TOKENS" in small.json()["detail"]
        assert (await big).status_code == 200
        assert (await client.post("/reward", json={"items": long_items(1, "small")})).status_code == 200


async def test_http_disconnect_drops_queued_work(tight: ServiceProcess, tmp_path: Path) -> None:
    def dropped() -> float:
        text = httpx.get(f"{tight.url}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("r3_dropped_texts_total"))

    before = dropped()
    async with httpx.AsyncClient(base_url=tight.url, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/reward", json={"items": long_items(400, "gone")})
    for _ in range(50):
        await asyncio.sleep(0.1)
        if dropped() > before:
            break
    assert dropped() > before
    ok = httpx.post(f"{tight.url}/reward", json={"items": long_items(2, "after")}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["rewards"]) == 2
    # A client leaving is counted, not logged as a crash.
    assert 'r3_requests_total{endpoint="/reward",status="499"}' in httpx.get(f"{tight.url}/metrics").text
    assert "Traceback" not in tight.log.read_text()


def reward_body(items: list[dict]) -> bytes:
    return json.dumps({"items": items}).encode()


async def test_a_burst_past_the_bound_is_refused_before_any_admitted_work_finishes(
        tight: ServiceProcess) -> None:
    """Refusals cost no waiting: they must not sit behind the classification or scoring of the
    requests admitted before them (they once came back after 7-8 s)."""
    bodies = [reward_body(long_items(8, f"burst{r}")) for r in range(16)]  # 8 items each, bound 16
    started = time.perf_counter()

    async def timed(body: bytes) -> tuple[int, float]:
        status, _ = await post_plain(tight.url, "/reward", body)
        return status, time.perf_counter() - started

    answers = await asyncio.gather(*(timed(body) for body in bodies))
    refused = [seconds for status, seconds in answers if status == 429]
    done = [seconds for status, seconds in answers if status == 200]
    assert len(done) + len(refused) == len(bodies) and done and len(refused) >= len(bodies) // 2
    assert max(refused) < min(done)


def test_concurrent_http_requests_score_as_they_would_alone(server_url: str) -> None:
    groups = [[{"query": f"Prompt {g}: describe a cat.", "response": f"Cat answer {g}.{r} " * (r + 1)}
               for r in range(8)] for g in range(6)]

    async def all_at_once() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=server_url, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/reward", json={"items": [item]})
                                               for group in groups for item in group))
        return [r.json()["rewards"][0] for r in responses]

    concurrent = asyncio.run(all_at_once())
    alone = [httpx.post(f"{server_url}/reward", json={"items": [item]}).json()["rewards"][0]
             for group in groups for item in group]
    assert concurrent == pytest.approx(alone, rel=1e-5)
    metrics = httpx.get(f"{server_url}/metrics").text
    assert "r3_batch_size_bucket" in metrics and "r3_dedup_hits_total" in metrics


def test_ready_queue_batches_the_oldest_with_its_length_neighbours() -> None:
    loop = asyncio.new_event_loop()
    try:
        def entry(name: str, length: int, at: float) -> Entry:
            return Entry(name, loop.create_future(), False, ids=[0] * length, ready_at=at)

        queue = FairQueue({})  # one tenant
        old_short = entry("old short", 10, 0.0)
        longs = [entry(f"long {i}", 100 + i, 1.0 + i) for i in range(5)]
        near = [entry(f"near {i}", 9 + i % 3, 10.0 + i) for i in range(6)]
        gone = entry("client left", 10, 0.5)
        gone.waiters = 0
        queue.add([old_short, gone, *longs, *near])
        abandoned: list[Entry] = []
        limits = BatchLimits(max_tokens=60, max_size=100, max_wait_s=0, max_queue_tokens=100)
        batch = queue.take(limits, abandoned)
        # The oldest live text leads; only lengths within MIN_FILL of the longest join; budget 60
        # padded tokens at length 11 allows 5 texts.
        assert batch[0] is old_short and len(batch) == 5
        assert all(len(e.ids) <= 11 for e in batch) and abandoned == [gone]
        assert queue.count == 13 - 5 - 1 and queue.oldest() is longs[0]
    finally:
        loop.close()
