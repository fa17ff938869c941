"""Two training jobs on one service (two API keys, equal weight): does one job's burst starve the
other's steady traffic? Starts r3-serve on 127.0.0.1 with the two tenants, measures its capacity
in a closed loop, then runs the steady job alone at `--steady` of capacity, and again while the
other job sends, every `--period` seconds, a burst of `--burst` × capacity × period requests at once.
Writes OUT.json and OUT.md.

    python -m r3_tools.tenants --duration 120 --out bench/results/tenants

Target: the steady job keeps ≥ 95% of its requests answered 200, its p50 within 2× of alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import sys
import time
from pathlib import Path

from r3_tools.loadgen import (
    DATA,
    Target,
    Workload,
    burst,
    closed_loop,
    free_port,
    make_pairs,
    open_loop,
    parse_mix,
    start_server,
)
from r3_tools.loadtest import summarize
from r3_tools.soak import TRAINER_MIX


def workload(mix: str, seed: int, pool: int, tag: str = "") -> Workload:
    return Workload(parse_mix(mix), make_pairs(DATA, pool, grouped=False), seed=seed, tag=tag)


async def bursts(target: Target, load: Workload, count: int, period: float, duration: float) -> list[dict]:
    """A burst of `count` requests every `period` s for `duration` s, whether or not the last one
    has been answered; each burst's summary."""
    sent = [asyncio.ensure_future(burst(target, load, count))]
    for _ in range(1, max(1, round(duration / period))):
        await asyncio.sleep(period)
        sent.append(asyncio.ensure_future(burst(target, load, count)))
    return [summarize(run) for run in await asyncio.gather(*sent)]


async def measure(args: argparse.Namespace, url: str, keys: dict[str, str]) -> dict:
    steady = Target(url, timeout=args.timeout, headers={"Authorization": f"Bearer {keys['steady']}"})
    bursty = Target(url, timeout=args.timeout, headers={"Authorization": f"Bearer {keys['bursty']}"})
    steady_load = workload(args.mix, 0, 4096)
    await closed_loop(steady, steady_load, args.users, args.warmup)
    capacity = summarize(await closed_loop(steady, steady_load, args.users, args.capacity_seconds))
    rate = args.steady * capacity["requests_per_s"]
    alone = summarize(await open_loop(steady, steady_load, rate, args.duration, drain=args.timeout))
    per_burst = max(1, round(args.burst * capacity["requests_per_s"] * args.period))
    other_job = workload(args.mix, 1, 4096, tag="(the other job)")
    shared, burst_runs = await asyncio.gather(
        open_loop(steady, steady_load, rate, args.duration, drain=args.timeout),
        bursts(bursty, other_job, per_burst, args.period, args.duration))
    shared_summary = summarize(shared)
    statuses: dict[str, int] = {}
    for run in burst_runs:
        for status, count in {"200": run["ok"], **run["errors_by_status"]}.items():
            statuses[status] = statuses.get(status, 0) + count
    ok_share = shared_summary["ok"] / max(1, shared_summary["requests"])
    p50_ratio = shared_summary["latency_ms"]["p50"] / alone["latency_ms"]["p50"]
    return {"capacity": capacity, "steady_rate": rate, "burst_requests": per_burst, "alone": alone,
            "shared": shared_summary, "bursts": statuses, "steady_ok_share": ok_share, "p50_ratio": p50_ratio,
            "passed": ok_share >= 0.95 and p50_ratio <= 2.0}


def markdown(report: dict) -> str:
    alone, shared = report["alone"]["latency_ms"], report["shared"]["latency_ms"]
    c = report["config"]
    return "\n".join([
        "# Two tenants: a steady job beside another job's bursts", "",
        f"Machine: {report['machine']}. Capacity (closed loop, {c['users']} users, mix {c['mix']}): "
        f"{report['capacity']['requests_per_s']:.2f} requests/s. Steady job: {c['steady']:.0%} of it "
        f"({report['steady_rate']:.2f} requests/s) for {c['duration']:.0f} s; bursting job: "
        f"{report['burst_requests']} requests at once every {c['period']:g} s "
        f"({c['burst']:g}× capacity).", "",
        "| steady job | requests | answered 200 | p50 ms | p95 ms | p99 ms |", "|---|--:|--:|--:|--:|--:|",
        f"| alone | {report['alone']['requests']} | {report['alone']['ok']} | {alone['p50']:.0f} "
        f"| {alone['p95']:.0f} | {alone['p99']:.0f} |",
        f"| beside the bursts | {report['shared']['requests']} | {report['shared']['ok']} "
        f"({report['steady_ok_share']:.1%}) | {shared['p50']:.0f} | {shared['p95']:.0f} "
        f"| {shared['p99']:.0f} |", "",
        f"The bursting job's answers: {report['bursts']}.",
        f"Verdict: {'PASS' if report['passed'] else 'FAIL'} (steady job ≥ 95% answered 200: "
        f"{report['steady_ok_share']:.1%}; p50 within 2× of alone: × {report['p50_ratio']:.2f}).", ""])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m r3_tools.tenants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of each phase")
    p.add_argument("--steady", type=float, default=0.3, help="the steady job's share of capacity")
    p.add_argument("--burst", type=float, default=3.0, help="the bursting job's load, × capacity")
    p.add_argument("--period", type=float, default=10.0, help="seconds between bursts")
    p.add_argument("--mix", default=TRAINER_MIX)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--capacity-seconds", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", type=Path, default=Path("bench/results/tenants"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    keys = {name: secrets.token_hex(16) for name in ("steady", "bursty")}
    tenants = json.dumps([{"name": name, "key": key} for name, key in keys.items()])
    port = free_port()
    server = start_server({"R3_TENANTS": tenants, "HF_HUB_OFFLINE": "1"}, port)
    try:
        report = asyncio.run(measure(args, f"http://127.0.0.1:{port}", keys))
    finally:
        server.terminate()
        server.wait(30)
    report["machine"] = f"{platform.machine()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    report["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    text = markdown(report)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
