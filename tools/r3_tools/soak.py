"""Soak test of a running service (started by `scripts/soak.sh`): warm up, measure capacity in a
closed loop, then hold a fraction of it (default 80%) open-loop for `--duration` seconds (hours,
for a training run's lifetime) while sampling where the service's memory is, from its `/metrics`:
RSS, the C allocator's arenas, CPython's heap and each cache's bytes. Faults may be injected
while it runs (`--faults`): a Redis restart, a storm of clients that leave mid-request, a burst at
twice the queue bound. Writes OUT.json, OUT.png and OUT.md; exits 1 unless the verdict is a pass:

- no errors in the soak's own traffic;
- RSS over the last 75% of the run within ±`--band`% of its level at 25% (per-minute medians),
  and its least-squares slope over that part under `--max-slope`% an hour;
- the p99 latency of the last 10 minutes at most `--p99-ratio` × that of minutes 10-20 (runs of
  30 minutes or more).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from r3_service.engine.admission import item_texts, words
from r3_tools.loadgen import (
    DATA,
    Outcome,
    Run,
    Target,
    Workload,
    closed_loop,
    make_pairs,
    open_loop,
    parse_mix,
    percentiles,
    post_plain,
    scrape,
)
from r3_tools.loadtest import describe, summarize

TRAINER_MIX = "1:0.4,8:0.4,grpo8:0.2"  # OpenRLHF's single samples, small batches, GRPO groups
FAULTS = ("redis", "disconnects", "burst")
MIB = 1 << 20
STORE_RECOVERY_S = 30.0  # how long the service may take to find Redis again after it restarts


# --- memory samples --------------------------------------------------------------------------

def memory_sample(url: str, headers: dict[str, str]) -> dict[str, float | dict[str, float]]:
    """Where the service's memory is now, in MiB (CPython's heap in blocks), from its /metrics."""
    values = scrape(url, headers)

    def labelled(name: str, label: str) -> dict[str, float]:
        prefix = f'{name}{{{label}="'
        return {key[len(prefix):-2]: value / MIB for key, value in values.items() if key.startswith(prefix)}

    return {"rss": values["process_resident_memory_bytes"] / MIB,
            "allocator": labelled("r3_allocator_bytes", "kind"),
            "caches": labelled("r3_cache_bytes", "cache"),
            "python_blocks": values.get("r3_python_allocated_blocks", 0.0),
            "python_traced": values.get("r3_python_traced_bytes", 0.0) / MIB}


async def sample_memory(url: str, headers: dict[str, str], every_s: float, origin: float,
                        samples: list[dict]) -> None:
    """Append a timed `memory_sample` every `every_s` until cancelled (a failed scrape is skipped)."""
    while True:
        try:
            sample = await asyncio.to_thread(memory_sample, url, headers)
            samples.append({"t": time.perf_counter() - origin, **sample})
        except (httpx.HTTPError, KeyError):
            pass
        await asyncio.sleep(every_s)


def minute_medians(samples: list[dict], start_s: float = 0.0) -> list[tuple[float, float]]:
    """(minute's middle in s, median RSS MiB) of each minute from `start_s`."""
    minutes: dict[int, list[float]] = {}
    for sample in samples:
        if sample["t"] >= start_s:
            minutes.setdefault(int(sample["t"] // 60), []).append(sample["rss"])
    return [(60 * m + 30, statistics.median(v)) for m, v in sorted(minutes.items())]


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB an hour."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_m = statistics.fmean(m for _, m in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return 3600 * sum((t - mean_t) * (m - mean_m) for t, m in points) / spread if spread else 0.0


def rss_verdict(samples: list[dict], duration: float, band_pct: float, max_slope_pct: float) -> dict:
    """RSS over the last 75% of the run against its level at 25% (per-minute medians, so one
    allocator burst does not decide it): the widest excursion, and the least-squares slope."""
    quarter = duration / 4
    around = [s["rss"] for s in samples if abs(s["t"] - quarter) <= max(60.0, duration / 40)]
    level = statistics.median(around or [samples[0]["rss"]])
    points = minute_medians(samples, quarter) or [(s["t"], s["rss"]) for s in samples[-2:]]
    excursion = max((abs(m - level) for _, m in points), default=0.0)
    slope = slope_per_hour(points)
    return {"level_at_25pct_mib": level, "min_mib": min(m for _, m in points),
            "max_mib": max(m for _, m in points), "widest_excursion_pct": 100 * excursion / level,
            "slope_mib_per_h": slope, "slope_pct_per_h": 100 * slope / level,
            "ready_mib": samples[0]["rss"], "final_mib": points[-1][1],
            "within_band": 100 * excursion / level <= band_pct,
            "slope_ok": 100 * slope / level < max_slope_pct}


# --- latency over time -----------------------------------------------------------------------

def minute_timeline(run: Run) -> list[dict]:
    """Per minute (by when each request finished): requests, errors, latency percentiles."""
    minutes: dict[int, list[Outcome]] = {}
    for outcome in run.outcomes:
        minutes.setdefault(int(outcome.end // 60), []).append(outcome)
    return [{"minute": m, "requests": len(o), "errors": sum(not x.ok for x in o),
             "items": sum(x.items for x in o if x.ok), **percentiles([x.latency for x in o if x.ok])}
            for m, o in sorted(minutes.items())]


def p99_between(run: Run, start_s: float, end_s: float) -> float | None:
    latencies = [o.latency for o in run.outcomes if o.ok and start_s <= o.end < end_s]
    return percentiles(latencies)["p99"] if latencies else None


def latency_verdict(run: Run, duration: float, max_ratio: float) -> dict:
    """p99 of the last 10 minutes against minutes 10-20 (None where the run is under 30 minutes)."""
    if duration < 1800:
        return {"early_p99_ms": None, "late_p99_ms": None, "ratio": None, "ok": True}
    early, late = p99_between(run, 600, 1200), p99_between(run, duration - 600, duration)
    ratio = late / early if early and late else None
    return {"early_p99_ms": early, "late_p99_ms": late, "ratio": ratio,
            "ok": ratio is not None and ratio <= max_ratio}


# --- faults ----------------------------------------------------------------------------------

@dataclass
class Faults:
    """What the faults need and what they did."""

    url: str
    headers: dict[str, str]
    workload: Workload
    redis_url: str | None = None
    redis_start: str | None = None  # the command that starts the same redis-server again
    redis_down_s: float = 5.0
    leaving_clients: int = 200
    origin: float = 0.0
    log: list[dict] = field(default_factory=list)
    restarted: list[subprocess.Popen] = field(default_factory=list)

    async def run(self, name: str) -> dict:
        started = time.perf_counter()
        try:
            report = await getattr(self, name)()
        except Exception as error:  # reported, never silently lost with its task
            report = {"failed": f"{type(error).__name__}: {error}"}
        entry = {"fault": name, "t": started - self.origin, "seconds": time.perf_counter() - started,
                 **report}
        self.log.append(entry)
        print(f"fault {name} at {entry['t']:.0f} s: {report}", flush=True)
        return entry

    async def redis(self) -> dict:
        """Shut Redis down (saving), keep it down `redis_down_s`, start it again with its data."""
        if not (self.redis_url and self.redis_start):
            return {"skipped": "no --redis-url and --redis-start"}
        client = redis.Redis.from_url(self.redis_url)
        with contextlib.suppress(redis.ConnectionError):  # the server closes it as it exits
            client.shutdown(save=True)
        await asyncio.sleep(self.redis_down_s)
        degraded = await asyncio.to_thread(self._store_status)
        self.restarted.append(subprocess.Popen(shlex.split(self.redis_start), stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, start_new_session=True))
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                await asyncio.sleep(0.1)
        back = time.perf_counter()
        status = await asyncio.to_thread(self._store_status)
        while status != "ok" and time.perf_counter() - back < STORE_RECOVERY_S:  # R3_REDIS_RETRY_S apart
            await asyncio.sleep(0.5)
            status = await asyncio.to_thread(self._store_status)
        return {"store_while_down": degraded, "store_after": status,
                "store_back_after_s": round(time.perf_counter() - back, 1), "keys_after": client.dbsize()}

    def _store_status(self) -> str:
        return httpx.get(f"{self.url}/readyz", timeout=10).json()["store"].get("status", "?")

    async def disconnects(self) -> dict:
        """`leaving_clients` clients post a 64-item body and leave 10-300 ms later, unanswered."""
        parts = httpx.URL(self.url)
        bodies = [json.dumps({"items": [self._item() for _ in range(64)]}).encode()
                  for _ in range(self.leaving_clients)]
        head = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())

        async def leave(body: bytes) -> None:
            _, writer = await asyncio.open_connection(parts.host, parts.port)
            writer.write(f"POST /reward HTTP/1.1\r\nHost: {parts.host}\r\nContent-Type: application/json\r\n"
                         f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            await asyncio.sleep(random.uniform(0.01, 0.3))
            writer.close()

        await asyncio.gather(*(leave(body) for body in bodies))
        return {"clients": len(bodies)}

    def _item(self) -> dict:
        return self.workload.next().body.get("items", [{}])[0] or {"query": "q", "response": "r"}

    async def burst(self) -> dict:
        """64-item requests at once, charged (as admission charges them) about twice the queue
        bound in tokens."""
        info = httpx.get(f"{self.url}/v1/info", headers=self.headers, timeout=30).json()
        bound = info["models"][0]["max_queue_tokens"]
        bodies, tokens = [], 0
        while tokens < 2 * bound:
            items = [self._item() for _ in range(64)]
            texts = {text for item in items for text in item_texts(
                item["query"], item["response"], item.get("reference"), item.get("query_type"))}
            tokens += sum(words(text) + 2 for text in texts)  # MiniLM's two special tokens
            bodies.append(json.dumps({"items": items}).encode())
        statuses = await asyncio.gather(*(post_plain(self.url, "/reward", body, headers=self.headers)
                                          for body in bodies), return_exceptions=True)
        counted: dict[str, int] = {}
        for status in statuses:
            key = str(status[0]) if isinstance(status, tuple) else type(status).__name__
            counted[key] = counted.get(key, 0) + 1
        return {"requests": len(bodies), "tokens": tokens, "queue_bound": bound, "statuses": counted}

    def stop(self) -> None:
        for process in self.restarted:
            process.terminate()


def parse_faults(spec: str) -> list[tuple[str, float]]:
    """`redis@0.3,disconnects@0.5,burst@0.7`: each fault at that fraction of the soak."""
    faults = []
    for token in filter(None, spec.split(",")):
        name, _, at = token.partition("@")
        if name not in FAULTS or not at:
            raise argparse.ArgumentTypeError(f"bad fault {token!r}: NAME@FRACTION, NAME one of "
                                             f"{', '.join(FAULTS)}")
        faults.append((name, float(at)))
    return faults


def around_faults(run: Run, samples: list[dict], faults: list[dict], window_s: float = 300.0) -> None:
    """Add to each fault the soak traffic's errors and the RSS medians in the `window_s` before
    it and after it ends."""
    for fault in faults:
        begin, end = fault["t"], fault["t"] + fault["seconds"]

        def rss(lo: float, hi: float) -> float | None:
            found = [s["rss"] for s in samples if lo <= s["t"] < hi]
            return statistics.median(found) if found else None

        fault["soak_errors_before"] = sum(not o.ok for o in run.outcomes if begin - window_s <= o.end < begin)
        fault["soak_errors_during_after"] = sum(not o.ok for o in run.outcomes
                                                if begin <= o.end < end + window_s)
        fault["rss_before_mib"] = rss(begin - window_s, begin)
        fault["rss_after_mib"] = rss(end, end + window_s)


# --- the run ---------------------------------------------------------------------------------

async def soak(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    target = Target(args.url, timeout=args.timeout, headers=headers)
    pairs = make_pairs(args.data, args.pool, grouped=False)
    workload = Workload(parse_mix(args.mix), pairs, labels=args.labels)
    ready = await asyncio.to_thread(memory_sample, args.url, headers)
    await closed_loop(target, workload, args.users, args.warmup)  # caches, allocator, lazy imports
    capacity = summarize(await closed_loop(target, workload, args.users, args.capacity_seconds))
    rate = args.fraction * capacity["requests_per_s"]
    print(f"capacity {capacity['requests_per_s']:.2f} requests/s ({capacity['items_per_s']:.1f} items/s); "
          f"soaking at {rate:.2f} requests/s for {args.duration:.0f} s", flush=True)
    fault_headers = {"Authorization": f"Bearer {args.fault_key}"} if args.fault_key else headers
    fault_workload = Workload(parse_mix("64"), make_pairs(args.data, 2048, grouped=False), seed=1)
    origin = time.perf_counter()
    faults = Faults(args.url, fault_headers, fault_workload, args.redis_url, args.redis_start, origin=origin)
    samples: list[dict] = []
    background = [asyncio.ensure_future(sample_memory(args.url, headers, args.sample_every, origin, samples))]

    async def at(name: str, fraction: float) -> None:
        await asyncio.sleep(fraction * args.duration)
        await faults.run(name)

    background += [asyncio.ensure_future(at(name, fraction)) for name, fraction in args.faults]
    try:
        run = await open_loop(target, workload, rate, args.duration, drain=args.timeout)
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        faults.stop()
    around_faults(run, samples, faults.log)
    return {"capacity": capacity, "rate_requests_per_s": rate, "summary": summarize(run),
            "minutes": minute_timeline(run), "memory_at_ready": ready, "memory_samples": samples,
            "faults": faults.log,
            "rss": rss_verdict(samples, args.duration, args.band, args.max_slope),
            "latency": latency_verdict(run, args.duration, args.p99_ratio)}


def passed(report: dict) -> bool:
    rss = report["rss"]
    return (report["summary"]["errors"] == 0 and rss["within_band"] and rss["slope_ok"]
            and report["latency"]["ok"])


def markdown(report: dict, title: str) -> str:
    s, rss, cap, lat = report["summary"], report["rss"], report["capacity"], report["latency"]
    p = s["latency_ms"]
    config = report["config"]
    lines = [
        f"# {title}", "",
        f"Machine: {report['machine']}. Capacity (closed loop, {config['users']} users): "
        f"{cap['requests_per_s']:.2f} requests/s = {cap['items_per_s']:.1f} items/s; "
        f"soak rate {report['rate_requests_per_s']:.2f} requests/s ({config['fraction']:.0%}).", "",
        "| duration s | requests | errors | items/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
        f"| {config['duration']:.0f} | {s['requests']} | {s['errors']} | {s['items_per_s']:.1f} "
        + "".join(f"| {p.get(k, 0):.0f} " for k in ("p50", "p95", "p99", "max")) + "|", "",
        "| RSS at ready | level at 25% | min, max after | widest excursion | slope | final |",
        "|--:|--:|--:|--:|--:|--:|",
        f"| {rss['ready_mib']:.0f} MiB | {rss['level_at_25pct_mib']:.0f} MiB | {rss['min_mib']:.0f}, "
        f"{rss['max_mib']:.0f} MiB | {rss['widest_excursion_pct']:.1f}% | "
        f"{rss['slope_mib_per_h']:+.1f} MiB/h "
        f"({rss['slope_pct_per_h']:+.2f}%/h) | {rss['final_mib']:.0f} MiB |", "",
    ]
    if lat["ratio"] is not None:
        lines += [f"p99 of minutes 10-20: {lat['early_p99_ms']:.0f} ms; of the last 10 minutes: "
                  f"{lat['late_p99_ms']:.0f} ms (× {lat['ratio']:.2f}).", ""]
    if report["faults"]:
        lines += ["| fault | at s | lasted s | what it did "
                  "| soak errors 5 min before / during and 5 min after "
                  "| RSS median 5 min before / after |", "|---|--:|--:|---|--:|--:|"]
        for f in report["faults"]:
            did = {k: v for k, v in f.items() if k not in {"fault", "t", "seconds", "soak_errors_before",
                                                          "soak_errors_during_after", "rss_before_mib",
                                                          "rss_after_mib"}}
            before, after = f["rss_before_mib"], f["rss_after_mib"]
            lines.append(f"| {f['fault']} | {f['t']:.0f} | {f['seconds']:.1f} | {json.dumps(did)} | "
                         f"{f['soak_errors_before']} / {f['soak_errors_during_after']} | "
                         f"{before or 0:.0f} / {after or 0:.0f} MiB |")
        lines.append("")
    lines += [
        f"Errors by status: {s['errors_by_status'] or 'none'}; "
        f"by exception: {s['errors_by_exception'] or 'none'}.",
        f"Verdict: {'PASS' if report['passed'] else 'FAIL'} (0 errors; RSS after the first quarter within "
        f"±{config['band']:g}% of its level then, per-minute medians, slope under "
        f"{config['max_slope']:g}%/h; "
        f"p99 of the last 10 minutes ≤ {config['p99_ratio']:g}× minutes 10-20).", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path, title: str) -> None:
    """Four panels against time: throughput and errors, latency, RSS with the allocator's account,
    the caches and CPython's heap; faults marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes, samples = report["minutes"], report["memory_samples"]
    figure, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    t_min = [60 * m["minute"] + 30 for m in minutes]
    axes[0].plot(t_min, [m["items"] / 60 for m in minutes], label="items/s answered 200")
    axes[0].bar(t_min, [m["errors"] for m in minutes], width=50, color="red", label="errors a minute")
    for key in ("p50", "p99"):
        axes[1].plot(t_min, [m.get(key, math.nan) for m in minutes], label=f"{key} ms (a minute)")
    t = [s["t"] for s in samples]
    axes[2].plot(t, [s["rss"] for s in samples], color="purple", label="RSS")
    for kind in ("arena", "in_use", "free", "mmapped"):
        axes[2].plot(t, [s["allocator"].get(kind, math.nan) for s in samples], lw=0.8, label=f"malloc {kind}")
    for name in sorted({n for s in samples for n in s["caches"]}):
        axes[3].plot(t, [s["caches"].get(name, math.nan) for s in samples], label=f"cache {name} MiB")
    blocks = axes[3].twinx()
    blocks.plot(t, [s["python_blocks"] / 1e6 for s in samples], color="gray", ls="--",
                label="CPython blocks (millions)")
    blocks.legend(fontsize=8, loc="upper right")
    for axis, label in zip(axes, ("items/s", "latency ms", "MiB", "MiB"), strict=True):
        for fault in report["faults"]:
            axis.axvline(fault["t"], color="orange", lw=1)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")
    for fault in report["faults"]:
        axes[0].annotate(fault["fault"], (fault["t"], 0), fontsize=8, color="darkorange")
    axes[-1].set_xlabel("seconds into the soak")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m r3_tools.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--duration", type=float, default=600.0, help="soak seconds (default 600)")
    p.add_argument("--fraction", type=float, default=0.8, help="of measured capacity (default 0.8)")
    p.add_argument("--users", type=int, default=8, help="closed-loop users measuring capacity")
    p.add_argument("--warmup", type=float, default=15.0, help="closed-loop seconds before measuring")
    p.add_argument("--capacity-seconds", type=float, default=30.0)
    p.add_argument("--sample-every", type=float, default=10.0, help="memory sampling period, seconds")
    p.add_argument("--band", type=float, default=5.0, help="allowed RSS excursion after 25%%, percent")
    p.add_argument("--max-slope", type=float, default=2.0, help="allowed RSS slope, percent an hour")
    p.add_argument("--p99-ratio", type=float, default=1.2, help="allowed late/early p99 ratio")
    p.add_argument("--mix", default=TRAINER_MIX)
    p.add_argument("--pool", type=int, default=4096, help="distinct pairs the load cycles through")
    p.add_argument("--labels", action="store_true", help="send query types and references (default: "
                   "the service looks them up in its store, as when a trainer sends bare prompts)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--api-key", help="the soak traffic's key (a tenant)")
    p.add_argument("--faults", type=parse_faults, default=[], help="e.g. redis@0.3,disconnects@0.5,burst@0.7")
    p.add_argument("--fault-key", help="the faults' key (another tenant); default: the soak's")
    p.add_argument("--redis-url", help="the store's Redis, for the redis fault")
    p.add_argument("--redis-start", help="command line that starts that Redis again (the redis fault)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=Path("bench/results/soak"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = asyncio.run(soak(args))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = httpx.get(f"{args.url}/v1/info", headers=headers, timeout=30).json().get("models", [{}])[0]
    report["machine"] = (f"{platform.machine()} {os.cpu_count()} CPUs, model {model.get('model')} on "
                         f"{model.get('device')} ({model.get('dtype')}), {time.strftime('%Y-%m-%d')}")
    report["service_model"] = model  # batching limits in force, the measured queue bound included
    report["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                        if k not in {"api_key", "fault_key"}}
    report["passed"] = passed(report)
    title = f"r3 soak: {args.duration:.0f} s at {args.fraction:.0%} of capacity, mix {args.mix}"
    print(f"{title}\n{describe(report['summary'])}\nRSS: "
          f"{ {k: v for k, v in report['rss'].items()} }\nlatency: {report['latency']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report, title))
    plot(report, args.out.with_suffix(".png"), title)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
