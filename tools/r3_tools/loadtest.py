"""`r3-loadtest`: drive a running r3 service and report what its clients saw.

Open loop (`--rate R`): request i is due at i/R seconds and its latency counts from then, so a
slow server cannot slow the arrivals down and hide its own queueing (coordinated omission).
Closed loop (`--users N`): N clients, each sending as soon as its last answer came back.
Burst (`--burst N`): N requests at once, each on its own plain HTTP/1.1 connection, as a trainer
sends a whole rollout batch; latency is reported per status (how fast are the 429s?). `--floor`
then sends the same burst to a bare refuser (uvicorn, read, orjson parse, 429) in its own process,
and prints its 429 latencies beside r3's: the floor of this machine and client.
Requests are drawn from a mix of shapes: N distinct items, `grpoN` (one prompt, N responses)
and `openrlhf` (one /get_reward sample), from AlpacaFarm pairs. Reports throughput, latency
percentiles, errors by HTTP status and by exception, as JSON and a PNG over time.
`--history` first sends requests of a given kind (tiny, long, mix, hostile), unmeasured.
Only loopback targets unless --allow-remote.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from r3_tools.commands import require
from r3_tools.loadgen import (
    DATA,
    HISTORIES,
    Run,
    Target,
    Workload,
    burst,
    closed_loop,
    history_bodies,
    make_pairs,
    open_loop,
    parse_mix,
    percentiles,
    send_history,
    start_bare_refuser,
)

DEFAULT_MIX = "1:0.5,8:0.3,64:0.2"


def check_target(url: str, allow_remote: bool) -> None:
    """Refuse anything but loopback unless the user says otherwise: a load test is an attack on
    whoever else answers."""
    host = urlsplit(url).hostname or ""
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{url} is not a loopback address; pass --allow-remote to load a remote host")


def summarize(run: Run) -> dict:
    """Throughput of answered-200 requests, their latency, and every failure by cause."""
    ok = [o for o in run.outcomes if o.ok]
    elapsed = max(run.elapsed, 1e-9)
    statuses = Counter(str(o.status) for o in run.outcomes if o.status is not None and not o.ok)
    exceptions = Counter(o.error for o in run.outcomes if o.error is not None)
    retry_after = [float(o.retry_after) for o in run.outcomes if o.status == 429 and o.retry_after]
    return {
        "requests": len(run.outcomes), "ok": len(ok), "errors": run.errors,
        "elapsed_s": run.elapsed, "requests_per_s": len(ok) / elapsed, "items_per_s": run.items_ok / elapsed,
        "latency_ms": percentiles(run.latencies),
        "latency_ms_by_status": {
            str(status): percentiles([o.latency for o in run.outcomes if o.status == status])
            for status in sorted({o.status for o in run.outcomes if o.status})},
        "errors_by_status": dict(statuses), "errors_by_exception": dict(exceptions),
        "mean_retry_after_s": sum(retry_after) / len(retry_after) if retry_after else None,
    }


def timeline(run: Run) -> list[dict]:
    """Per second of the run (by when each request finished): throughput, latency, errors."""
    seconds = max(1, math.ceil(max((o.end for o in run.outcomes), default=0.0)))
    buckets: list[list] = [[] for _ in range(seconds)]
    for outcome in run.outcomes:
        buckets[min(seconds - 1, int(outcome.end))].append(outcome)
    rows = []
    for second, outcomes in enumerate(buckets):
        ok = [o for o in outcomes if o.ok]
        rows.append({"t": second, "requests_per_s": len(ok), "items_per_s": sum(o.items for o in ok),
                     "errors": len(outcomes) - len(ok), **percentiles([o.latency for o in ok])})
    return rows


def _throughput_panel(axis, rows: list[dict], errors: list[tuple[int, int]]) -> None:
    t = [r["t"] for r in rows]
    axis.plot(t, [r["items_per_s"] for r in rows], marker=".", label="items/s")
    requests = axis.twinx()  # same units as errors/s
    requests.plot(t, [r["requests_per_s"] for r in rows], marker=".", color="tab:orange")
    requests.set_ylabel("requests/s", color="tab:orange")
    if errors:
        requests.scatter(*zip(*errors, strict=True), color="red", marker="x", label="errors/s", zorder=3)
        requests.legend(fontsize=8, loc="upper right")


def _latency_panel(axis, rows: list[dict]) -> None:
    for key in ("p50", "p95", "p99"):
        axis.plot([r["t"] for r in rows], [r.get(key, math.nan) for r in rows], marker=".", label=key)
    axis.set_yscale("log")


def plot(rows: list[dict], path: Path, title: str, rss: list[tuple[float, float]] | None = None) -> None:
    """Throughput and latency percentiles per second, seconds with errors shaded red; optionally
    the service's RSS (soak)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3 if rss else 2, 1, figsize=(11, 3.2 * (3 if rss else 2)), sharex=True)
    errors = [(r["t"], r["errors"]) for r in rows if r["errors"]]
    _throughput_panel(axes[0], rows, errors)
    _latency_panel(axes[1], rows)
    for axis in axes[:2]:
        for second, _ in errors:
            axis.axvspan(second, second + 1, color="red", alpha=0.15, linewidth=0)
    if rss:
        axes[2].plot([s for s, _ in rss], [m for _, m in rss], color="purple", label="service RSS (MiB)")
    for axis, label in zip(axes, ("items/s", "latency (ms)", "MiB"), strict=False):
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")
    axes[-1].set_xlabel("seconds into the run")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def describe(summary: dict) -> str:
    lat = summary["latency_ms"]
    text = (f"{summary['requests']} requests in {summary['elapsed_s']:.1f} s: {summary['ok']} ok, "
            f"{summary['errors']} failed; {summary['requests_per_s']:.1f} requests/s, "
            f"{summary['items_per_s']:.1f} items/s")
    if lat:
        text += (f"\nlatency ms: p50 {lat['p50']:.0f}  p95 {lat['p95']:.0f}  p99 {lat['p99']:.0f}  "
                 f"max {lat['max']:.0f}")
    for status, by in summary["latency_ms_by_status"].items():
        if status != "200":
            text += f"\n{status} answers ms: p50 {by['p50']:.0f}  p99 {by['p99']:.0f}  max {by['max']:.0f}"
    for label, key in (("by status", "errors_by_status"), ("by exception", "errors_by_exception")):
        if summary[key]:
            text += f"\nerrors {label}: " + ", ".join(f"{k} x{v}" for k, v in sorted(summary[key].items()))
    return text


def refusals(summary: dict) -> str:
    """One line: the burst's outcome and its 429 latencies (the target: every 429 within 1 s)."""
    by = summary["latency_ms_by_status"].get("429", {})
    fives = sum(n for status, n in summary["errors_by_status"].items() if status.startswith("5"))
    timeouts = sum(n for error, n in summary["errors_by_exception"].items() if "Timeout" in error)
    return (f"{summary['ok']} admitted (200), {summary['errors_by_status'].get('429', 0)} refused (429), "
            f"{fives} 5xx, {timeouts} timeouts; 429 p50 {by.get('p50', math.nan):.0f} ms, "
            f"p99 {by.get('p99', math.nan):.0f} ms, max {by.get('max', math.nan):.0f} ms")


def floor(args: argparse.Namespace) -> dict:
    """The same burst (the same bodies) against the bare refuser, started for it and stopped."""
    process, url = start_bare_refuser()
    try:
        run = asyncio.run(burst(Target(url, timeout=args.timeout), build_workload(args), args.burst))
        return summarize(run)
    finally:
        process.terminate()
        process.wait(10)


def build_workload(args: argparse.Namespace) -> Workload:
    mix = parse_mix(f"grpo{args.grpo}" if args.grpo else "openrlhf" if args.openrlhf else args.mix)
    return Workload(mix, make_pairs(args.data, args.pool, grouped=False), labels=not args.unlabelled,
                    backend=args.backend, seed=args.seed, data=args.data)


def target_of(args: argparse.Namespace) -> Target:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return Target(args.url, timeout=args.timeout, headers=headers, max_connections=args.max_connections)


def parse_history(spec: str) -> list[tuple[str, int]]:
    """`tiny:200,long:200`: the kinds of `history_bodies` and how many of each, in order."""
    parts = []
    for token in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, count = token.partition(":")
        if kind not in HISTORIES or not count.isdigit():
            raise ValueError(f"--history {token!r}: KIND:COUNT with KIND one of {', '.join(HISTORIES)}")
        parts.append((kind, int(count)))
    return parts


async def drive(args: argparse.Namespace, target: Target, workload: Workload) -> Run:
    for kind, count in parse_history(args.history or ""):
        statuses = await send_history(args.url, history_bodies(kind, count), target.headers)
        print(f"history {kind} x{count}: " + ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items())))
    if args.burst:
        return await burst(target, workload, args.burst)
    if args.rate:
        return await open_loop(target, workload, args.rate, args.duration, args.drain)
    return await closed_loop(target, workload, args.users, args.duration, args.drain)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r3-loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not loopback")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="open loop: requests per second on a fixed schedule")
    mode.add_argument("--users", type=int, default=8, help="closed loop: concurrent clients (default 8)")
    mode.add_argument("--burst", type=int, metavar="N",
                      help="N requests at once, one plain HTTP/1.1 connection each, then stop")
    p.add_argument("--floor", action="store_true",
                   help="with --burst: then the same burst against a bare refuser (uvicorn, read, orjson "
                        "parse, 429) started on 127.0.0.1, its 429 latencies printed beside r3's")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--mix", default=DEFAULT_MIX,
                       help=f"weighted request shapes: N items, grpoN, openrlhf (default {DEFAULT_MIX})")
    shape.add_argument("--grpo", type=int, metavar="G",
                       help="every request a GRPO group: 1 prompt, G responses")
    shape.add_argument("--openrlhf", action="store_true", help="every request one /get_reward sample")
    p.add_argument("--unlabelled", action="store_true",
                   help="send query and response only, so the service looks types/references up")
    p.add_argument("--backend", help="preset sent with every request (default: the service's own)")
    p.add_argument("--history", metavar="KIND:N,...",
                   help="first send N /reward requests of each kind (tiny, long, mix, hostile), 8 at a "
                        "time, unmeasured: admission must not depend on what came before")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals (default 30)")
    p.add_argument("--drain", type=float, default=30.0,
                   help="hard stop: requests still running this long after --duration are cut off")
    p.add_argument("--timeout", type=float, default=180.0, help="per-request timeout, seconds (default 180)")
    p.add_argument("--max-connections", type=int, default=256, help="open loop connection pool")
    p.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--pool", type=int, default=4096, help="distinct pairs cycled through")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the summary and per-second timeline here")
    p.add_argument("--plot", type=Path, help="write a PNG of throughput, latency and errors over time")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.plot:
        require("r3-loadtest --plot", "bench")  # before the load, not after it
    try:
        check_target(args.url, args.allow_remote)
        parse_history(args.history or "")
        workload = build_workload(args)
        if args.floor and not args.burst:
            raise ValueError("--floor needs --burst N")
    except ValueError as error:
        print(f"r3-loadtest: {error}", file=sys.stderr)
        return 2
    mode = (f"burst of {args.burst}" if args.burst else f"open loop {args.rate:g} req/s" if args.rate
            else f"closed loop {args.users} users")
    title = f"r3-loadtest {args.url}: {mode}, mix {','.join(str(s) for s, _ in workload.mix)}"
    run = asyncio.run(drive(args, target_of(args), workload))
    summary = summarize(run)
    print(f"{title}\n{describe(summary)}")
    if args.burst:
        print(f"r3: {refusals(summary)}")
    if args.floor:
        summary["floor"] = floor(args)
        print(f"bare refuser (the floor), same burst: {refusals(summary['floor'])}")
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "api_key"}
        args.json.write_text(json.dumps({"config": config, "summary": summary, "timeline": timeline(run)},
                                        indent=2))
    if args.plot:
        plot(timeline(run), args.plot, title)
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
