"""Prompt refusals: the bare refuser (the floor of this machine and client) answers 429, the burst
benchmark prints and records its figures beside the service's, and the access log of a burst of
429s is sampled."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from r3_service.cli import SampledRefusals
from r3_tools.loadgen import post_plain, start_bare_refuser
from r3_tools.loadtest import main


@pytest.mark.slow
def test_the_bare_refuser_answers_429_with_retry_after() -> None:
    process, url = start_bare_refuser()
    try:
        for body in (b'{"items": []}', b"not json"):
            status, headers = asyncio.run(post_plain(url, "/reward", body, timeout=10))
            assert status == 429 and headers["retry-after"] == "1"
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.slow
def test_a_burst_with_floor_records_the_bare_refusers_figures(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Any server will do as the target (here another bare refuser): the floor is a second run."""
    process, url = start_bare_refuser()
    try:
        out = tmp_path / "burst.json"
        main(["--url", url, "--burst", "20", "--mix", "8", "--floor", "--json", str(out)])
    finally:
        process.terminate()
        process.wait(10)
    summary = json.loads(out.read_text())["summary"]
    assert summary["errors_by_status"] == {"429": 20} and summary["floor"]["errors_by_status"] == {"429": 20}
    assert {"p50", "p99"} <= set(summary["floor"]["latency_ms_by_status"]["429"])
    printed = capsys.readouterr().out
    floor = "bare refuser (the floor), same burst: 0 admitted (200), 20 refused (429), 0 5xx, 0 timeouts"
    assert floor in printed


def test_floor_needs_a_burst(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--floor", "--duration", "1"]) == 2
    assert "--floor needs --burst" in capsys.readouterr().err


def access_line(status: int, created: float) -> logging.LogRecord:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "POST", "/reward", "1.1", status), None)
    record.created = created
    return record


def test_sampled_access_log_keeps_the_first_429_a_second_and_counts_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    sample = SampledRefusals()
    passed = [sample.filter(access_line(status, at)) for status, at in [
        (429, 10.0), (429, 10.2), (429, 10.9), (200, 10.95), (429, 11.1), (429, 11.5), (429, 12.0)]]
    assert passed == [True, False, False, True, True, False, True]
    with caplog.at_level(logging.INFO, "r3_service"):
        assert not sample.filter(access_line(429, 12.3))
        assert sample.filter(access_line(200, 12.5))
    counts = [r.getMessage() for r in caplog.records if "not in the access log" in r.getMessage()]
    assert counts == ["1 more 429 answers not in the access log (R3_ACCESS_LOG=sampled)"]
