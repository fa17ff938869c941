"""SIGTERM under load: requests in flight finish with 200, requests arriving after the signal get
503 (or connection refused once the listening socket is closed), never a dropped connection, a
timeout or a 500, and the process exits 0 within a bounded time."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from conftest import DATA, start_service
from r3_tools.loadgen import Outcome, Run, Target, Workload, closed_loop, make_pairs, open_loop, parse_mix

pytestmark = pytest.mark.slow  # real servers, training or process faults throughout

MARGIN_S = 0.3  # a request sent this close to the signal may or may not have reached the server
EXIT_BOUND_S = 60.0
REFUSED = {"ConnectError"}  # the socket closed: the client may retry elsewhere


def after_signal_ok(outcome: Outcome) -> bool:
    return outcome.status == 503 or outcome.error in REFUSED


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(tmp_path: Path) -> None:
    # A queue bound far above this load, so every request before the signal is admitted.
    proc = start_service(tmp_path, R3_EMBEDDING_CACHE_SIZE="0", R3_MAX_QUEUE_TOKENS="10000000")
    heavy = Workload(parse_mix("8:0.7,64:0.3"), make_pairs(DATA, 1024, grouped=False))
    arrivals = Workload(parse_mix("1"), make_pairs(DATA, 256, grouped=True))

    async def scenario() -> tuple[Run, Run, float, float]:
        target = Target(proc.url, timeout=60)
        busy = asyncio.ensure_future(closed_loop(target, heavy, 3, 2.5))
        steady = asyncio.ensure_future(open_loop(target, arrivals, 10, 5.0))
        await asyncio.sleep(2.0)
        signalled_at = time.perf_counter()
        proc.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.process.wait, EXIT_BOUND_S)
        assert code == 0, f"exit code {code}"
        return await busy, await steady, signalled_at, time.perf_counter() - signalled_at

    try:
        busy, steady, signalled_at, exited_after = asyncio.run(scenario())
    finally:
        if proc.process.poll() is None:
            proc.process.kill()
    assert exited_after < EXIT_BOUND_S
    for run in (busy, steady):
        signal_s = signalled_at - run.origin
        before = [o for o in run.outcomes if o.start < signal_s - MARGIN_S]
        after = [o for o in run.outcomes if o.start > signal_s + MARGIN_S]
        assert all(o.ok for o in before), [(o.start, o.status, o.error) for o in before if not o.ok]
        assert all(after_signal_ok(o) for o in after), [(o.start, o.status, o.error) for o in after
                                                        if not after_signal_ok(o)]
        assert all(o.ok or after_signal_ok(o) for o in run.outcomes)
    signal_s = signalled_at - busy.origin
    in_flight = [o for o in busy.outcomes if o.start < signal_s < o.end]
    assert in_flight, "the signal came when no request was in flight: the test proved nothing"
    assert "Traceback" not in proc.log.read_text()
