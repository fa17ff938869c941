"""Several training jobs on one service: each API key is a tenant; admission and batching share
each model between the tenants with work queued, by weight, so one job's burst cannot starve
another's steady traffic (engine/queueing.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import DATA, ServiceProcess, start_service
from r3_service.engine.queueing import BatchLimits, Entry, FairQueue, Shares
from r3_service.settings import Settings
from r3_tools.loadgen import make_pairs, post_plain

KEYS = {"job-a": "key-a-0123456789", "job-b": "key-b-abcdefghij"}


def test_a_burst_fills_the_bound_alone_but_not_the_share_an_active_tenant_is_owed() -> None:
    shares = Shares(100, {"a": 1.0, "b": 1.0})
    for _ in range(10):  # a alone: the whole bound is its to use
        assert shares.admits("a", 10)
        shares.hold("a", 10)
    assert not shares.admits("a", 10)
    assert shares.admits("b", 30)  # b holds nothing: its first request goes in whatever is held
    shares.hold("b", 30)
    assert shares.admits("b", 20)  # within b's half of the bound, though the queue is over it
    shares.hold("b", 20)
    assert not shares.admits("b", 10)  # past its half, and the queue is full
    for _ in range(6):  # a drains 60 tokens: still over its half while b is owed none
        shares.release("a", 10)
    assert shares.admits("a", 10) and shares.total == 90


def test_shares_by_weight() -> None:
    shares = Shares(90, {"big": 2.0, "small": 1.0})
    shares.hold("small", 1)
    shares.hold("big", 1)
    assert shares.admits("big", 58) and not shares.admits("big", 60)  # owed 60 of 90
    assert shares.admits("small", 29) and not shares.admits("small", 30)  # owed 30; big's 59 reserved


def test_an_idle_tenant_is_owed_nothing() -> None:
    shares = Shares(100, {"a": 1.0, "b": 1.0})
    assert shares.admits("a", 100)  # b never sent anything: no reserve for it
    shares.hold("a", 50)
    assert shares.admits("a", 50)


def test_the_next_batch_starts_with_the_tenant_served_least() -> None:
    loop = asyncio.new_event_loop()
    try:
        def entry(name: str, tenant: str, length: int = 10) -> Entry:
            return Entry(name, loop.create_future(), False, ids=[0] * length, ready_at=0.0, tenant=tenant)

        queue = FairQueue({"a": 1.0, "b": 1.0})
        limits = BatchLimits(max_tokens=40, max_size=4, max_wait_s=0, max_queue_tokens=10**6)
        backlog = [entry(f"a{i}", "a") for i in range(20)]
        queue.add(backlog)
        assert queue.take(limits, []) == backlog[:4]  # a alone: first come, first served
        late = entry("b0", "b")
        queue.add([late])
        batch = queue.take(limits, [])
        # b has been served nothing: its text leads the batch ahead of a's older backlog,
        # and a's texts fill the rest
        assert batch[0] is late and batch[1:] == backlog[4:7]
        assert queue.depth("a") == 13 and queue.depth("b") == 0
        # while both have texts waiting, a batch is cut at the shared budget: a shorter wait for b
        shared = BatchLimits(max_tokens=40, max_size=4, max_wait_s=0, max_queue_tokens=10**6,
                             shared_max_tokens=20)
        queue.add([entry("b1", "b")])
        assert [e.input for e in queue.take(shared, [])] == ["b1", "a7"]
        assert len(queue.take(shared, [])) == 4  # a alone again: the full batch
    finally:
        loop.close()


def test_a_text_two_jobs_share_waits_in_the_queue_of_the_job_served_least() -> None:
    loop = asyncio.new_event_loop()
    try:
        def entry(name: str, tenant: str) -> Entry:
            return Entry(name, loop.create_future(), True, ids=[0] * 10, ready_at=1.0, tenant=tenant)

        queue = FairQueue({})
        limits = BatchLimits(max_tokens=20, max_size=2, max_wait_s=0, max_queue_tokens=10**6)
        backlog = [entry(f"a{i}", "a") for i in range(10)]
        queue.add(backlog)
        queue.take(limits, [])  # a has been served
        queue.add([entry("b0", "b")])
        queue.claim(backlog[9], "b")  # b's request needs a's last text (a shared reference)
        assert backlog[9].tenant == "b" and queue.depth("a") == 7 and queue.depth("b") == 2
        assert [e.input for e in queue.take(limits, [])] == ["b0", "a9"]
        queue.claim(backlog[2], "a")  # its own tenant: nothing moves
        assert queue.depth("a") == 7
    finally:
        loop.close()


def test_a_text_joined_again_after_its_clients_left_is_computed_not_dropped() -> None:
    """A text whose clients all left, then joined by another request before it was dropped,
    must still be computed (it was once cancelled: a 500 for the request that joined it)."""
    loop = asyncio.new_event_loop()
    try:
        text = Entry("shared", loop.create_future(), True, ids=[0] * 10, ready_at=1.0)
        queue = FairQueue({})
        queue.add([text])
        text.waiters = 0  # its client left
        assert queue.oldest() is None  # passed by as abandoned
        text.waiters = 1  # another request joins it
        abandoned: list[Entry] = []
        limits = BatchLimits(max_tokens=100, max_size=4, max_wait_s=0, max_queue_tokens=10**6)
        assert queue.take(limits, abandoned) == [] and abandoned == []
        assert queue.take(limits, abandoned) == [text]
    finally:
        loop.close()


def test_tenants_come_from_api_keys_and_from_the_tenant_list() -> None:
    settings = Settings(api_keys="plain-key", tenants=[{"name": "job-a", "key": "k", "weight": 3}])
    assert settings.tenant_weights() == {"job-a": 3.0, "key1": 1.0}
    with pytest.raises(ValueError, match="unique"):
        Settings(tenants=[{"name": "x", "key": "k"}, {"name": "y", "key": "k"}])
    with pytest.raises(ValueError):
        Settings(tenants=[{"name": "has space", "key": "k"}])


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service shared by two tenants, with a small queue bound so one burst fills it."""
    tenants = [{"name": name, "key": key} for name, key in KEYS.items()]
    proc = start_service(tmp_path_factory.mktemp("tenants"), R3_TENANTS=json.dumps(tenants),
                         R3_MAX_QUEUE_TOKENS="40000")
    yield proc
    proc.stop()


def test_a_burst_of_one_job_neither_refuses_nor_delays_the_other(two_jobs: ServiceProcess) -> None:
    pairs = make_pairs(DATA, 64 * 40 + 4, grouped=False)
    burst = [json.dumps({"items": [p.item() for p in pairs[64 * i: 64 * i + 64]]}).encode()
             for i in range(40)]
    steady = [json.dumps({"items": [pairs[64 * 40 + i].item()]}).encode() for i in range(4)]
    done: list[tuple[str, int, float]] = []

    async def post(job: str, body: bytes) -> None:
        status, _ = await post_plain(two_jobs.url, "/reward", body,
                                     headers={"Authorization": f"Bearer {KEYS[job]}"})
        done.append((job, status, time.perf_counter()))

    async def main() -> None:
        bursting = [asyncio.ensure_future(post("job-a", body)) for body in burst]
        await asyncio.sleep(0.5)  # the burst is admitted and queued
        for body in steady:  # one request at a time, as a trainer's single samples
            await post("job-b", body)
        await asyncio.gather(*bursting)

    asyncio.run(main())
    a = [(status, at) for job, status, at in done if job == "job-a"]
    b = [(status, at) for job, status, at in done if job == "job-b"]
    assert sorted({status for status, _ in a}) == [200, 429]  # the burst passed the bound
    assert all(status == 200 for status, _ in b)  # the steady job was never refused
    # and was computed ahead of the burst's backlog: first come, first served, the burst's admitted
    # requests (all queued before it) would all have finished before its first request did
    assert sum(status == 200 and at > b[0][1] for status, at in a) > 0
    metrics = httpx.get(f"{two_jobs.url}/metrics", headers={"Authorization": f"Bearer {KEYS['job-b']}"}).text
    assert 'r3_tenant_rejections_total{tenant="job-a"}' in metrics
    assert 'r3_tenant_rejections_total{tenant="job-b"}' not in metrics
    assert 'r3_tenant_queue_depth{tenant="job-b"}' in metrics
    assert not any(key in metrics for key in KEYS.values())  # names only, never a key
