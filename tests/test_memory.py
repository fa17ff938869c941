"""Memory over a training run's lifetime: every cache bounded in bytes and shown in /metrics,
cached rows that own their memory, the allocator's account in /metrics, and the soak's verdict
and faults (tools/r3_tools/soak.py) on a real service, Redis and two tenants."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from r3_service.caches import ENTRY_OVERHEAD, LruCache
from r3_tools.loadgen import Outcome, Run
from r3_tools.soak import latency_verdict, rss_verdict, slope_per_hour


def test_a_cache_evicts_by_bytes_as_well_as_by_entries() -> None:
    cache: LruCache[str, str] = LruCache("t", max_entries=100, max_bytes=10 * (100 + ENTRY_OVERHEAD),
                                         sizeof=lambda key, value: len(value))
    for index in range(20):
        cache.put(f"k{index}", "x" * 100)
    assert len(cache) == 10 and cache.bytes == 10 * (100 + ENTRY_OVERHEAD)
    assert cache.get("k9") is None and cache.get("k19") == "x" * 100  # the oldest went first
    cache.put("huge", "x" * 10_000)  # larger than the whole bound: not kept, nothing evicted
    assert "huge" not in cache and len(cache) == 10
    cache.put("k19", "y" * 50)  # replaced: counted once
    assert cache.bytes == 9 * (100 + ENTRY_OVERHEAD) + 50 + ENTRY_OVERHEAD


def test_cached_rows_own_their_memory_and_every_cache_is_in_metrics(app_client) -> None:
    items = [{"query": f"Name a city in country {n}.", "response": f"City {n}.", "query_type": "open"}
             for n in range(8)]
    assert app_client.post("/reward", json={"items": items}).status_code == 200
    engine = app_client.app.state.engine
    scheduler = next(iter(engine.pool.schedulers.values()))
    rows = [scheduler.cache.get(item["query"]) for item in items]
    assert all(row is not None for row in rows)
    # a view would keep its whole batch's output alive (8 rows here, thousands in a long run)
    assert all(row.untyped_storage().nbytes() == row.nbytes for row in rows)
    assert scheduler.cache.bytes >= sum(row.nbytes for row in rows)
    metrics = app_client.get("/metrics").text
    for name in (scheduler.name, "store", "guards.tokenise", "guards.query_view"):
        assert f'r3_cache_bytes{{cache="{name}"}}' in metrics
    assert 'r3_allocator_bytes{kind="free"}' in metrics and "process_resident_memory_bytes" in metrics
    assert "r3_python_allocated_blocks" in metrics


def test_the_arena_cap_is_applied_or_left_to_glibc(monkeypatch) -> None:
    from r3_service import allocator
    from r3_service.settings import Settings

    monkeypatch.setenv("R3_MALLOC_ARENA_MAX", "0")
    assert allocator.tune(Settings().malloc_arena_max) == {}  # 0: glibc's own default
    if allocator.heap():  # on glibc
        assert allocator.tune(Settings(malloc_arena_max=2).malloc_arena_max) == {"arena_max": 2}


def test_the_rss_verdict_tells_a_plateau_from_a_leak() -> None:
    hours = 2 * 3600
    flat = [{"t": t, "rss": 700 + (5 if t % 600 < 30 else 0)} for t in range(0, hours, 10)]
    verdict = rss_verdict(flat, hours, band_pct=5, max_slope_pct=2)
    assert verdict["within_band"] and verdict["slope_ok"]
    leak = [{"t": t, "rss": 700 + 20 * t / 3600} for t in range(0, hours, 10)]  # +2.9%/h
    verdict = rss_verdict(leak, hours, band_pct=5, max_slope_pct=2)
    assert verdict["within_band"] and not verdict["slope_ok"]  # inside the band, but climbing
    step = [{"t": t, "rss": 700 if t < hours * 0.6 else 760} for t in range(0, hours, 10)]
    assert not rss_verdict(step, hours, band_pct=5, max_slope_pct=2)["within_band"]
    assert slope_per_hour([(0, 0.0), (3600, 10.0), (7200, 20.0)]) == pytest.approx(10.0)


def test_the_latency_verdict_compares_the_last_ten_minutes_with_minutes_ten_to_twenty() -> None:
    def run(late_ms: float) -> Run:
        outcomes = [Outcome(t, 1, (late_ms if t > 3000 else 100) / 1000, 200) for t in range(0, 3600, 2)]
        return Run(outcomes, 3600, 0.0)

    assert latency_verdict(run(110), 3600, 1.2)["ok"]
    slow = latency_verdict(run(150), 3600, 1.2)
    assert not slow["ok"] and slow["ratio"] == pytest.approx(1.5)


@pytest.mark.slow
def test_a_short_soak_with_every_fault_keeps_the_soaks_own_traffic_whole(tmp_path) -> None:
    """scripts/soak.sh as a user runs it, for 40 s: Redis restarted (its data kept), 200 clients
    leaving mid-request and another tenant's burst at twice the queue bound, none of which costs
    the soak's own traffic a request."""
    out = tmp_path / "soak"
    env = {**os.environ, "SOAK_SECONDS": "40", "OUT": str(out),
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "FAULTS": "redis@0.2,disconnects@0.45,burst@0.6"}
    arguments = ["--users", "4", "--warmup", "3", "--capacity-seconds", "5", "--sample-every", "2"]
    done = subprocess.run(["bash", "scripts/soak.sh", *arguments], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0 and "Verdict" in out.with_suffix(".md").read_text()
    assert report["summary"]["errors"] == 0, done.stdout[-2000:]
    faults = {fault["fault"]: fault for fault in report["faults"]}
    assert faults["redis"]["store_while_down"] == "degraded" and faults["redis"]["store_after"] == "ok"
    assert faults["redis"]["keys_after"] >= 2000  # the loaded query types came back with it
    assert faults["disconnects"]["clients"] == 200
    assert faults["burst"]["statuses"].get("429", 0) > 0  # the burst passed the bound: its excess refused
    assert all(f["soak_errors_during_after"] == 0 for f in report["faults"])
    assert report["memory_samples"] and report["memory_samples"][0]["caches"]
    assert report["latency"]["ratio"] is None  # the p99 rule needs 30 minutes: not judged here
    assert done.returncode in (0, 1)  # 1: a 40 s run is too short for the RSS rules to mean much
