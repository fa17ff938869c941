"""Soak test of a running service (started by `scripts/soak.sh`): warm up, measure capacity in a
closed loop, then hold a fraction of it (default 80%) open-loop for `--duration` seconds while
sampling the service process's RSS. Writes OUT.json, OUT.png and OUT.md; exits 1 unless there
were no errors and RSS grew less than `--max-growth` percent after the warm-up."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

from r3_tools.loadgen import DATA, Target, Workload, closed_loop, make_pairs, open_loop, parse_mix
from r3_tools.loadtest import DEFAULT_MIX, describe, plot, summarize, timeline


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def sample_rss(pid: int, every_s: float, origin: float, samples: list[tuple[float, float]]) -> None:
    """Append (seconds since `origin`, MiB) every `every_s` until cancelled."""
    while True:
        samples.append((time.perf_counter() - origin, rss_mib(pid)))
        await asyncio.sleep(every_s)


def rss_growth(samples: list[tuple[float, float]], settle_s: float, window_s: float) -> dict[str, float]:
    """Growth from the `window_s` after `settle_s` to the last `window_s` (medians, so one GC
    cycle or allocator burst does not decide it)."""
    settled = [m for t, m in samples if settle_s <= t < settle_s + window_s] or [samples[0][1]]
    final = [m for t, m in samples if t >= max(settle_s, samples[-1][0] - window_s)] or [samples[-1][1]]
    baseline, last = statistics.median(settled), statistics.median(final)
    return {"start_mib": samples[0][1], "after_warmup_mib": baseline, "final_mib": last,
            "max_mib": max(m for _, m in samples), "growth_pct": 100 * (last - baseline) / baseline}


async def soak(args: argparse.Namespace) -> dict:
    target = Target(args.url, timeout=args.timeout)
    workload = Workload(parse_mix(args.mix), make_pairs(args.data, args.pool, grouped=False))
    await closed_loop(target, workload, args.users, args.warmup)  # caches, allocator, lazy imports
    capacity = summarize(await closed_loop(target, workload, args.users, args.capacity_seconds))
    rate = args.fraction * capacity["requests_per_s"]
    print(f"capacity {capacity['requests_per_s']:.2f} requests/s ({capacity['items_per_s']:.1f} items/s); "
          f"soaking at {rate:.2f} requests/s for {args.duration:.0f} s", flush=True)
    samples: list[tuple[float, float]] = []
    sampler = asyncio.ensure_future(sample_rss(args.pid, args.sample_every, time.perf_counter(), samples))
    try:
        run = await open_loop(target, workload, rate, args.duration, drain=args.timeout)
    finally:
        sampler.cancel()
    window = max(3 * args.sample_every, min(60.0, args.duration / 10))
    return {"capacity": capacity, "rate_requests_per_s": rate, "summary": summarize(run),
            "timeline": timeline(run), "rss": rss_growth(samples, args.settle, window),
            "rss_samples": samples}


def markdown(report: dict, title: str) -> str:
    s, rss, cap = report["summary"], report["rss"], report["capacity"]
    lat = s["latency_ms"]
    return "\n".join([
        f"# {title}", "",
        f"Machine: {report['machine']}. Capacity (closed loop, {report['config']['users']} users): "
        f"{cap['requests_per_s']:.2f} requests/s = {cap['items_per_s']:.1f} items/s; "
        f"soak rate {report['rate_requests_per_s']:.2f} requests/s ({report['config']['fraction']:.0%}).", "",
        "| duration s | requests | errors | items/s | p50 ms | p95 ms | p99 ms | max ms "
        "| RSS after warm-up MiB | RSS final MiB | RSS max MiB | growth |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        f"| {report['config']['duration']:.0f} | {s['requests']} | {s['errors']} | {s['items_per_s']:.1f} "
        + "".join(f"| {lat.get(k, 0):.0f} " for k in ("p50", "p95", "p99", "max"))
        + f"| {rss['after_warmup_mib']:.0f} | {rss['final_mib']:.0f} | {rss['max_mib']:.0f} "
        f"| {rss['growth_pct']:+.1f}% |", "",
        f"Errors by status: {s['errors_by_status'] or 'none'}; "
        f"by exception: {s['errors_by_exception'] or 'none'}.",
        f"Verdict: {'PASS' if report['passed'] else 'FAIL'} (0 errors and RSS growth < "
        f"{report['config']['max_growth']:g}% after the first {report['config']['settle']:.0f} s).", ""])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m r3_tools.soak", description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--pid", type=int, required=True, help="the service process, for RSS")
    p.add_argument("--duration", type=float, default=600.0, help="soak seconds (default 600)")
    p.add_argument("--fraction", type=float, default=0.8, help="of measured capacity (default 0.8)")
    p.add_argument("--users", type=int, default=8, help="closed-loop users measuring capacity")
    p.add_argument("--warmup", type=float, default=15.0, help="closed-loop seconds before measuring")
    p.add_argument("--capacity-seconds", type=float, default=30.0)
    p.add_argument("--settle", type=float, help="soak seconds before the RSS baseline (default 10%%)")
    p.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling period, seconds")
    p.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth, percent")
    p.add_argument("--mix", default=DEFAULT_MIX)
    p.add_argument("--pool", type=int, default=4096)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=Path("bench/results/soak"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.settle is None:
        args.settle = args.duration / 10
    report = asyncio.run(soak(args))
    model = httpx.get(f"{args.url}/v1/info", timeout=30).json().get("models", [{}])[0]
    report["machine"] = (f"{platform.machine()} {os.cpu_count()} CPUs, model {model.get('model')} on "
                         f"{model.get('device')}, {time.strftime('%Y-%m-%d')}")
    report["service_model"] = model  # batching limits in force, the measured queue bound included
    report["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report["passed"] = report["summary"]["errors"] == 0 and report["rss"]["growth_pct"] < args.max_growth
    title = f"r3 soak: {args.duration:.0f} s at {args.fraction:.0%} of capacity, mix {args.mix}"
    print(f"{title}\n{describe(report['summary'])}\nRSS: {report['rss']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report, title))
    plot(report["timeline"], args.out.with_suffix(".png"), title, rss=report["rss_samples"])
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
