"""`r3-loadtest` and the shared load generator: targets, request shapes, open-loop timing, report."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from conftest import DATA
from r3_tools.loadgen import Target, Workload, history_bodies, make_pairs, open_loop, parse_mix
from r3_tools.loadtest import check_target, main, parse_history


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.9.9.9", "http://localhost:1",
                                 "http://[::1]:8000"])
def test_loopback_targets_are_allowed(url: str) -> None:
    check_target(url, allow_remote=False)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000",
                                 "http://192.168.1.5"])
def test_other_targets_need_allow_remote(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="--allow-remote"):
        check_target(url, allow_remote=False)
    check_target(url, allow_remote=True)
    assert main(["--url", url, "--duration", "1"]) == 2  # refused before sending anything
    assert "--allow-remote" in capsys.readouterr().err


def test_mixes_draw_every_shape_reproducibly() -> None:
    pairs = make_pairs(DATA, 64, grouped=False)
    mix = parse_mix("1:0.4,8:0.3,grpo4:0.2,openrlhf:0.1")

    def draw(seed: int) -> list:
        workload = Workload(mix, pairs, labels=False, backend="li", seed=seed)
        return [workload.next() for _ in range(200)]

    requests = draw(0)
    assert [(r.path, r.body) for r in requests] == [(r.path, r.body) for r in draw(0)]
    assert {(r.path, r.items) for r in requests} == {("/reward", 1), ("/reward", 8), ("/reward", 4),
                                                     ("/get_reward", 1)}
    groups = [r.body["items"] for r in requests if r.path == "/reward" and r.items == 4]
    assert all(len({item["query"] for item in group}) == 1 for group in groups)  # one prompt, 4 answers
    assert all(len({item["response"] for item in group}) == 4 for group in groups)
    sample = next(r.body for r in requests if r.path == "/get_reward")
    assert sample["query"][0].startswith(sample["prompts"][0]) and sample["backend"] == "li"
    assert all(set(item) == {"query", "response"} for r in requests if r.path == "/reward"
               for item in r.body["items"])
    with pytest.raises(ValueError, match="grpoN"):
        parse_mix("grpo:1")


@asynccontextmanager
async def slow_server(seconds: float) -> AsyncIterator[str]:
    """An HTTP server that answers `{}` `seconds` after each request."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                await reader.readexactly(length)
                await asyncio.sleep(seconds)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_open_loop_latency_counts_from_the_schedule() -> None:
    """10 requests due over 0.9 s, one connection, 0.2 s each: the last one waits in the client
    for the nine before it and is answered ~2 s in, so its latency is ~1.1 s although it spent
    only 0.2 s on the wire. Timing from the send would report 0.2 s (coordinated omission)."""
    async with slow_server(0.2) as url:
        workload = Workload.fixed(make_pairs(DATA, 10, grouped=False), 1)
        run = await open_loop(Target(url, timeout=10, max_connections=1), workload, 10.0, 1.0)
    assert [o.status for o in run.outcomes] == [200] * 10
    assert [round(o.start, 1) for o in run.outcomes] == [i / 10 for i in range(10)]
    assert max(o.latency for o in run.outcomes) > 0.9


def test_report_against_the_live_service(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    code = main(["--url", server_url, "--rate", "4", "--duration", "2", "--json", str(out),
                 "--mix", "1:0.5,grpo4:0.3,openrlhf:0.2", "--plot", str(tmp_path / "run.png")])
    report = json.loads(out.read_text())
    assert code == 0 and report["summary"]["requests"] == 8 and report["summary"]["errors"] == 0
    assert set(report["summary"]["latency_ms"]) == {"p50", "p95", "p99", "max"}
    assert sum(row["requests_per_s"] for row in report["timeline"]) == 8
    assert "api_key" not in report["config"]
    assert (tmp_path / "run.png").stat().st_size > 10_000


def test_burst_sends_every_request_at_once_and_reports_by_status(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "burst.json"
    code = main(["--url", server_url, "--burst", "6", "--mix", "2,openrlhf", "--json", str(out)])
    summary = json.loads(out.read_text())["summary"]
    assert code == 0 and summary["requests"] == summary["ok"] == 6
    assert set(summary["latency_ms_by_status"]) == {"200"}
    assert summary["latency_ms_by_status"]["200"]["max"] == summary["latency_ms"]["max"]


def test_a_history_is_sent_first_and_unmeasured(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--url", server_url, "--history", "tiny:3,hostile:8", "--burst", "2", "--mix", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "history tiny x3: 200 x3" in out
    hostile = out.split("history hostile x8: ", 1)[1].splitlines()[0]
    assert "200 x2" in hostile and "400 x" in hostile and "422 x" in hostile  # each answered as documented
    assert "2 requests in" in out  # only the burst is measured


def test_history_kinds_and_counts_are_checked() -> None:
    assert parse_history("tiny:2, long:1") == [("tiny", 2), ("long", 1)]
    assert [len(history_bodies(kind, 5)) for kind in ("tiny", "long", "mix", "hostile")] == [5, 5, 5, 5]
    assert len(set(history_bodies("mix", 4))) == 4  # distinct queries: none is a repeat the cache serves
    for bad in ("tiny", "tiny:x", "huge:3"):
        with pytest.raises(ValueError, match="KIND:COUNT"):
            parse_history(bad)


def test_the_bench_table_gives_another_backends_cost_beside_the_defaults() -> None:
    from r3_tools.bench import Result, markdown

    rows = markdown([Result("engine-in-process", True, 80.0, 16, 64),
                     Result("engine-in-process[r3-guarded]", True, 60.0, 16, 64, x_default=0.74)],
                    {True: 20.0}, {True: 40.0}).splitlines()
    assert "× default backend" in rows[0] and len(rows) == 4
    assert rows[2].split("|")[8].strip() == "-" and rows[3].split("|")[8].strip() == "0.74"
