"""The query-type store: dataset parsing, `r3-qtypes load` into a real Redis, resolution order,
and scoring that survives Redis going away."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from conftest import DATA, ROOT, RedisServer, ServiceProcess, free_port, start_service, wait_until
from r3_service.rule.datasets import QueryRecord, read_records
from r3_service.store.records import query_key
from r3_service.store.stores import MemoryStore, QueryStore


def run_loader(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "r3_tools.qtypes", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_json_array_and_jsonl_parse_to_the_same_records(tmp_path: Path) -> None:
    rows = [{"instruction": "Name a colour.", "reference": "Red.", "query_type": "ce"},
            {"query": "Write a poem.", "qtype": "OPENENDED"},
            {"input": "2+2?", "output": "4"}]
    array, lines = tmp_path / "a.json", tmp_path / "a.jsonl"
    array.write_text(json.dumps(rows, indent=2))
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    expected = [("Name a colour.", QueryRecord("closed", "Red.")),
                ("Write a poem.", QueryRecord("open", None)),
                ("2+2?", QueryRecord(None, "4"))]
    assert read_records(array) == (expected, [])
    assert read_records(lines) == (expected, [])


def test_malformed_records_are_named_by_line_and_valid_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"input": "ok one", "qtype": "open"}),
        "{not json",
        json.dumps({"input": "", "qtype": "open"}),
        json.dumps({"input": "bad type", "qtype": "sometimes"}),
        json.dumps(["a", "list"]),
        json.dumps({"input": "no payload"}),
        json.dumps({"input": "reference not a string", "output": 42}),
        json.dumps({"input": "ok two", "output": "ref", "qtype": "CONSTRAINED"}),
    ]))
    records, errors = read_records(path)
    assert [q for q, _ in records] == ["ok one", "ok two"]
    assert [e.split(":")[0] for e in errors] == ["line 2", "line 3", "line 4", "line 5", "line 6", "line 7"]
    assert "invalid JSON" in errors[0]
    assert "non-empty string" in errors[1]
    assert "unknown query type 'sometimes'" in errors[2]
    assert "expected a JSON object" in errors[3]
    assert "nothing to store" in errors[4]
    assert "output must be a string" in errors[5]


def test_json_array_errors_name_the_line_of_the_element(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"input": "fine", "qtype": "oe"},\n  {"input": "x", "qtype": 3},\n  "s"\n]\n')
    records, errors = read_records(path)
    assert [q for q, _ in records] == ["fine"]
    assert errors[0].startswith("line 3:") and errors[1].startswith("line 4:")


def test_a_classifiers_probability_is_read_with_its_id_only(tmp_path: Path) -> None:
    path = tmp_path / "typed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"query": "a", "query_type": "open", "classified_by": "learned@1", "open_probability": 0.8},
        {"query": "b", "query_type": "open", "open_probability": 0.8},  # a label: no probability
        {"query": "c", "query_type": "open", "classified_by": "learned@1", "open_probability": 1.5},
        {"query": "d", "query_type": "open", "classified_by": "learned@1", "open_probability": "high"},
    ]) + "\n")
    records, errors = read_records(path)
    assert records == [("a", QueryRecord("open", None, "learned@1", 0.8)), ("b", QueryRecord("open"))]
    assert [e.split(":")[0] for e in errors] == ["line 3", "line 4"]
    assert all("open_probability must be a number in [0, 1]" in e for e in errors)


async def test_open_probability_round_trips_through_the_in_process_store() -> None:
    store = QueryStore(MemoryStore(16))
    record = QueryRecord("open", "Ref.", "learned@abc", 0.1 + 0.2)
    await store.put_many([("r3:q:k", "q", record)])
    assert await store.get_many(["r3:q:k"]) == [record]


async def test_open_probability_round_trips_through_redis(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    tag = uuid.uuid4().hex[:8]  # the session's Redis is shared with other tests
    queries = [f"Probability round trip {i} ({tag})." for i in range(5)]
    keys = [query_key(q) for q in queries]
    first = QueryRecord("closed", "Ref.", "learned@abc", 0.1 + 0.2)  # p(open) 0.30000000000000004
    second = QueryRecord("open", None, "x@1", 0.75)
    writer = QueryStore(MemoryStore(16), redis_server.url, timeout_s=1.0)
    reader = QueryStore(MemoryStore(16), redis_server.url, timeout_s=1.0)  # its own empty memory
    try:
        await writer.put_many([(keys[0], queries[0], first), (keys[1], queries[1], second)])
        assert client.hget(keys[0], "open_probability") == repr(0.1 + 0.2)  # exact, not rounded
        # Records written before the field existed, a foreign value, a data set's label.
        client.hset(keys[2], mapping={"query": queries[2], "query_type": "open", "classified_by": "old@1"})
        client.hset(keys[3], mapping={"query": queries[3], "query_type": "open", "classified_by": "old@1",
                                      "open_probability": "very"})
        client.hset(keys[4], mapping={"query": queries[4], "query_type": "closed", "open_probability": "0.2"})
        assert await reader.get_many(keys) == [first, second, QueryRecord("open", None, "old@1"),
                                               QueryRecord("open", None, "old@1"), QueryRecord("closed")]
        # A hard answer (rules, llm) over a probabilistic one does not inherit its probability.
        await writer.put_many([(keys[0], queries[0], QueryRecord("open", "Ref.", "llm@2"))])
        assert "open_probability" not in client.hgetall(keys[0])
        assert await reader.get_many(keys[:1]) == [QueryRecord("open", "Ref.", "llm@2")]
    finally:
        await writer.close()
        await reader.close()


def test_loader_loads_alpacafarm_as_is(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    result = run_loader("load", str(DATA), "--redis-url", redis_server.url)
    assert result.returncode == 0, result.stderr
    rows = json.loads(DATA.read_text())
    distinct = len({query_key(r["input"]) for r in rows})
    assert f"loaded 2000 records ({distinct} distinct queries)" in result.stdout
    assert "open 933, closed 1067" in result.stdout and "rejected 0" in result.stdout
    stored = client.hgetall(query_key(rows[0]["input"]))
    assert stored["reference"] == rows[0]["output"]
    assert stored["query_type"] == ("open" if rows[0]["qtype"] == "OPENENDED" else "closed")


def test_loader_reports_rejects_and_still_loads_valid_records(redis_server: RedisServer,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"query": "loader-valid-1", "qtype": "ce"}) + "\n{oops\n"
                    + json.dumps({"query": "loader-valid-2", "reference": "r"}) + "\n")
    result = run_loader("load", str(path), "--redis-url", redis_server.url)
    assert result.returncode == 1
    assert "line 2: invalid JSON" in result.stderr
    assert "loaded 2 records" in result.stdout and "rejected 1" in result.stdout
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert client.hget(query_key("loader-valid-1"), "query_type") == "closed"
    assert client.hget(query_key("loader-valid-2"), "reference") == "r"


def test_loader_without_a_redis_url_says_how_to_give_one(tmp_path: Path) -> None:
    result = run_loader("load", str(DATA))
    assert result.returncode == 2 and "--redis-url" in result.stderr


def post_reward(url: str, items: list[dict], timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/reward", json={"items": items, "return_components": True}, timeout=timeout)


def test_resolution_order_request_then_cache_then_default(service: ServiceProcess,
                                                          redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    query = "Resolution-order test: what is the boiling point of water at sea level?"
    client.hset(query_key(query), mapping={"query_type": "closed", "reference": "100 degrees Celsius."})
    response = "Water boils at 100 degrees Celsius at sea level."
    items = [
        {"query": query, "response": response},  # both from the store
        {"query": query, "response": response, "query_type": "open"},  # request type wins
        {"query": query, "response": response, "reference": "Two hundred."},  # request ref wins
        {"query": query, "response": response, "reference": "  "},  # blank ref = none → store
        {"query": "A query nobody stored, resolution test.", "response": response},
        {"query": "USER: " + query + " ASSISTANT:", "response": response},  # templated → same key
    ]
    got = post_reward(service.url, items).json()["components"]
    assert [(c["query_type"], c["query_type_source"]) for c in got[:4] + got[5:]] == [
        ("closed", "cache"), ("open", "request"), ("closed", "cache"), ("closed", "cache"),
        ("closed", "cache")]
    assert got[4]["query_type_source"] == "classifier"  # unknown to the store
    assert [c["reference_source"] for c in got] == ["cache", "cache", "request", "cache", None, "cache"]
    assert [c["relevance_target"] for c in got] == ["reference", "query", "reference", "reference",
                                                    "query", "reference"]
    assert got[0]["relevance"] != got[2]["relevance"]  # a different reference was used


def test_loaded_query_is_scored_from_the_cache(service: ServiceProcess, redis_server: RedisServer) -> None:
    rows = json.loads(DATA.read_text())
    assert run_loader("load", str(DATA), "--redis-url", redis_server.url).returncode == 0
    row = next(r for r in rows if r["qtype"] == "CONSTRAINED")
    got = post_reward(service.url, [{"query": row["input"], "response": row["output"]}]).json()
    component = got["components"][0]
    assert component["query_type_source"] == "cache" and component["query_type"] == "closed"
    assert component["reference_source"] == "cache" and component["relevance_target"] == "reference"
    assert component["relevance"] == pytest.approx(1.0, abs=1e-4)  # response == reference: cosine 1
    f_of_1 = (1.0 - 0.311) / (3.622 - 0.311) * 5.12  # the packaged model's calibrated range
    assert got["rewards"][0] == pytest.approx(f_of_1 * component["repetition_penalty"], rel=1e-4)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
              or line.startswith(name + "{")]
    return sum(values)


@pytest.mark.slow
def test_scoring_survives_redis_stopping_and_reconnects(tmp_path: Path) -> None:
    """Redis goes away mid-test: every request still gets 200, the fallback is counted and shown,
    and once Redis is back the store is used again without a restart."""
    own_redis = RedisServer(free_port(), tmp_path)
    own_redis.start()
    # No classifier: an unknown type must show the default (the fallback under test).
    proc = start_service(tmp_path, R3_REDIS_URL=own_redis.url, R3_REDIS_RETRY_S="0.5",
                         R3_QTYPE_CLASSIFIER="none")
    try:
        query = "Outage test: name the largest planet."
        redis.Redis.from_url(own_redis.url).hset(query_key(query), mapping={"query_type": "closed",
                                                                           "reference": "Jupiter."})
        item = {"query": query, "response": "Jupiter is the largest planet."}
        first = post_reward(proc.url, [item]).json()["components"][0]
        assert first["query_type_source"] == "cache"

        own_redis.stop()
        for _ in range(5):
            response = post_reward(proc.url, [item, {"query": "never stored", "response": "ok"}])
            assert response.status_code == 200
            components = response.json()["components"]
            # The in-process copy still knows what Redis answered before the outage.
            assert components[0]["query_type_source"] == "cache"
            assert components[1]["query_type_source"] == "default"
        ready = httpx.get(f"{proc.url}/readyz", timeout=10).json()
        assert ready["store"]["kind"] == "redis" and ready["store"]["status"] == "degraded"
        assert metric(proc.url, "r3_store_errors_total") >= 1
        assert metric(proc.url, "r3_store_fallbacks_total") >= 1
        assert proc.log.read_text().count("Redis store unavailable") == 1  # logged once

        own_redis.start()
        later = "Outage test: stored while the service was degraded."
        redis.Redis.from_url(own_redis.url).hset(query_key(later), mapping={"query_type": "closed"})

        def reconnected() -> bool:
            time.sleep(0.3)
            got = post_reward(proc.url, [{"query": later, "response": "x"}]).json()["components"][0]
            return got["query_type_source"] == "cache"

        wait_until(reconnected, 20, "store reconnection")
        assert httpx.get(f"{proc.url}/readyz", timeout=10).json()["store"]["status"] == "ok"
    finally:
        proc.stop()
        own_redis.stop()


@pytest.mark.slow
def test_in_process_store_preloaded_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "qtypes.jsonl"
    path.write_text(json.dumps({"query": "Preloaded: capital of Italy?", "output": "Rome.",
                                "qtype": "CONSTRAINED"}) + "\n")
    proc = start_service(tmp_path, R3_QTYPES_FILE=str(path))
    try:
        ready = httpx.get(f"{proc.url}/readyz", timeout=10).json()
        assert ready["store"] == {"kind": "memory", "records_in_memory": 1, "status": "embedded"}
        assert httpx.get(f"{proc.url}/v1/info", timeout=10).json()["store"] == "memory"
        got = post_reward(proc.url, [{"query": "Preloaded:  capital of Italy?", "response": "Rome."}])
        component = got.json()["components"][0]
        assert (component["query_type_source"], component["reference_source"]) == ("cache", "cache")
    finally:
        proc.stop()


@pytest.mark.slow
def test_a_hung_redis_costs_a_bounded_wait_not_a_failure(tmp_path: Path) -> None:
    """Redis frozen (SIGSTOP: connections stay open, nothing answers): lookups time out at
    R3_REDIS_TIMEOUT_MS, scoring carries on with the default, and thawing restores the store."""
    own_redis = RedisServer(free_port(), tmp_path)
    own_redis.start()
    proc = start_service(tmp_path, R3_REDIS_URL=own_redis.url, R3_REDIS_TIMEOUT_MS="100",
                         R3_QTYPE_CLASSIFIER="none",
                         R3_REDIS_RETRY_S="0.2")
    assert own_redis.process is not None
    try:
        query = "Frozen-store test: how many legs does a spider have?"
        redis.Redis.from_url(own_redis.url).hset(query_key(query), mapping={"query_type": "closed"})
        fresh = "Frozen-store test: a query Redis never answered."
        own_redis.process.send_signal(signal.SIGSTOP)
        for _ in range(3):
            got = post_reward(proc.url, [{"query": fresh, "response": "Eight."}], timeout=10)
            assert got.status_code == 200
            assert got.json()["components"][0]["query_type_source"] == "default"
        assert httpx.get(f"{proc.url}/readyz", timeout=10).json()["store"]["status"] == "degraded"
        own_redis.process.send_signal(signal.SIGCONT)

        def recovered() -> bool:
            time.sleep(0.3)
            got = post_reward(proc.url, [{"query": query, "response": "Eight."}]).json()
            return got["components"][0]["query_type_source"] == "cache"

        wait_until(recovered, 20, "store recovery")
    finally:
        if own_redis.process is not None:
            own_redis.process.send_signal(signal.SIGCONT)
        proc.stop()
        own_redis.stop()
